//! `imgcryptd`: see the library documentation.

fn main() {}
