//! The names the kernel engine gives its devices and keys, built here and nowhere else.
//!
//! A job's device-mapper device is named `imgcrypt-<job>` (what `dmsetup ls` shows) and carries
//! the DM UUID `IMGCRYPT-<job>`; its volume key sits in the kernel keyring as the `logon` key
//! `imgcrypt:job-<job>` while the table is loaded. The UUID prefix is what the start-up sweep
//! matches ([`is_ours`]): names can be reused by anyone, a UUID is set once at creation and is
//! ours alone. The prefix is deliberately not cryptsetup's `CRYPT-`, so cryptsetup, lsblk and
//! systemd never take our short-lived mappings for volumes of their own.
//!
//! Job ids restart at 1 with every daemon, so a mapping a crash left behind can carry the name a
//! new job wants; the sweep at start-up removes those before the first job runs.

/// Prefix of every mapper name the kernel engine creates.
pub const MAPPER_NAME_PREFIX: &str = "imgcrypt-";

/// Prefix of every DM UUID the kernel engine creates; the start-up sweep removes what carries it.
pub const DM_UUID_PREFIX: &str = "IMGCRYPT-";

/// Prefix of the kernel keyring descriptions of volume keys. `logon` keys must have a
/// `service:` prefix; this one names us in `/proc/keys`.
pub const KEY_DESCRIPTION_PREFIX: &str = "imgcrypt:job-";

/// The names of one job's devices and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobDeviceNames {
    job_id: u64,
    mapper_name: String,
    dm_uuid: String,
    key_description: String,
}

impl JobDeviceNames {
    /// The names for job `job_id`.
    pub fn for_job(job_id: u64) -> Self {
        Self {
            job_id,
            mapper_name: format!("{MAPPER_NAME_PREFIX}{job_id}"),
            dm_uuid: format!("{DM_UUID_PREFIX}{job_id}"),
            key_description: format!("{KEY_DESCRIPTION_PREFIX}{job_id}"),
        }
    }

    /// The job these names belong to.
    pub fn job_id(&self) -> u64 {
        self.job_id
    }

    /// The device-mapper name, `imgcrypt-<job>`.
    pub fn mapper_name(&self) -> &str {
        &self.mapper_name
    }

    /// The DM UUID, `IMGCRYPT-<job>`.
    pub fn dm_uuid(&self) -> &str {
        &self.dm_uuid
    }

    /// The description of the volume key's `logon` key, `imgcrypt:job-<job>`.
    pub fn key_description(&self) -> &str {
        &self.key_description
    }
}

/// Whether a device-mapper device with this UUID was made by the kernel engine.
pub fn is_ours(dm_uuid: &str) -> bool {
    dm_uuid.starts_with(DM_UUID_PREFIX)
}

/// The job id in one of our DM UUIDs, when it is exactly `IMGCRYPT-<decimal job id>`.
pub fn job_of_dm_uuid(dm_uuid: &str) -> Option<u64> {
    let digits = dm_uuid.strip_prefix(DM_UUID_PREFIX)?;
    // `u64::from_str` also takes a leading `+`, which we never write.
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let job_id: u64 = digits.parse().ok()?;
    // Only the canonical spelling round-trips ("07" is not a name we make).
    (JobDeviceNames::for_job(job_id).dm_uuid == dm_uuid).then_some(job_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_a_job() {
        let names = JobDeviceNames::for_job(42);
        assert_eq!(names.job_id(), 42);
        assert_eq!(names.mapper_name(), "imgcrypt-42");
        assert_eq!(names.dm_uuid(), "IMGCRYPT-42");
        assert_eq!(names.key_description(), "imgcrypt:job-42");
        let largest = JobDeviceNames::for_job(u64::MAX);
        assert_eq!(largest.mapper_name(), "imgcrypt-18446744073709551615");
        // Device-mapper limits: names and UUIDs below 128 bytes, no '/' in names.
        assert!(largest.mapper_name().len() < 128 && largest.dm_uuid().len() < 128);
        assert!(!largest.mapper_name().contains('/'));
        // dm-crypt splits its key argument at whitespace.
        assert!(!largest.key_description().contains(char::is_whitespace));
    }

    #[test]
    fn uuids_parse_back_to_their_job() {
        for job in [0, 1, 7, 1234, u64::MAX] {
            let names = JobDeviceNames::for_job(job);
            assert!(is_ours(names.dm_uuid()));
            assert_eq!(job_of_dm_uuid(names.dm_uuid()), Some(job));
        }
    }

    #[test]
    fn foreign_and_malformed_uuids() {
        for foreign in [
            "CRYPT-LUKS2-0123456789abcdef0123456789abcdef-root",
            "LVM-abc",
            "imgcrypt-1",
            "",
            "XIMGCRYPT-1",
        ] {
            assert!(!is_ours(foreign), "{foreign}");
            assert_eq!(job_of_dm_uuid(foreign), None, "{foreign}");
        }
        // Ours by prefix (the sweep removes them) but not a job id we would have written.
        for odd in [
            "IMGCRYPT-",
            "IMGCRYPT-+1",
            "IMGCRYPT-07",
            "IMGCRYPT-1x",
            "IMGCRYPT-18446744073709551616",
        ] {
            assert!(is_ours(odd), "{odd}");
            assert_eq!(job_of_dm_uuid(odd), None, "{odd}");
        }
    }
}
