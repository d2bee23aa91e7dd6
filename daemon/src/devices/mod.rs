//! Privileged device operations of the kernel engine, one small module each.
//!
//! The kernel engine ([`crate::engines::kernel`]) writes a payload through dm-crypt: it attaches
//! the output descriptor to a loop device, maps a dm-crypt target over it, and writes the
//! plaintext to the mapped device, which the kernel encrypts on its way to the output. The
//! pieces:
//!
//! - [`names`]: `imgcrypt-<job>`, `IMGCRYPT-<job>` and the key description, built in one place;
//! - [`loop_device`]: the output behind a loop device (by descriptor, autoclear, direct I/O);
//! - [`keyring`]: the volume key as a kernel `logon` key, referenced by the table, never in it;
//! - [`mapper`]: the `crypt` table, and device create / load / resume / remove by ioctl;
//! - [`node`]: opening `/dev/dm-<minor>` without udev, making the node where `/dev` lacks it;
//! - [`cleanup`]: the start-up sweep of devices a crashed daemon left behind;
//! - [`availability`]: whether all of this can run here, and if not, why.
//!
//! Every resource is held by a guard that releases it when dropped ([`loop_device::AttachedLoop`],
//! [`keyring::LogonKey`], [`mapper::Mapping`], [`node::BlockNode`]), so no error path, panic or
//! cancellation can forget a teardown step; explicit `detach`/`remove` calls exist to report
//! failures that a drop can only log. No `dmsetup`, `losetup` or `cryptsetup` process is run.

pub mod availability;
pub mod cleanup;
pub mod keyring;
pub mod loop_device;
pub mod mapper;
pub mod names;
pub mod node;
