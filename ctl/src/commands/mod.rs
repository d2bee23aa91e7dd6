//! One module per imgctl subcommand.

pub mod encrypt;
pub mod key;
