//! One module per imgctl subcommand.

pub mod daemon;
pub mod decrypt;
pub mod encrypt;
pub mod inspect;
pub mod jobs;
pub mod key;
pub mod rewrite;
pub mod upload;
pub mod verify;
