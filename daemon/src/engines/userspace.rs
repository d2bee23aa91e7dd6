//! The userspace engine (interface stub).
use super::{Engine, PayloadJob};
use imgcrypt_proto::api::EngineKind;
/// Engine.
pub struct UserspaceEngine;
impl UserspaceEngine {
    /// New.
    pub fn new() -> Self {
        Self
    }
}
impl Engine for UserspaceEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Userspace
    }
    fn write_payload(&self, _job: &PayloadJob<'_>) -> crate::Result<u64> {
        todo!()
    }
}
