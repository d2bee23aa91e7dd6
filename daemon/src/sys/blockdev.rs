//! Block device size (interface stub).
use std::fs::File;
/// Size.
pub fn size_of(_file: &File) -> crate::Result<u64> {
    todo!()
}
