//! Jobs: what one `io.imgcrypt` call does.
