//! `imgctl`: the unprivileged client of imgcryptd.

fn main() {}
