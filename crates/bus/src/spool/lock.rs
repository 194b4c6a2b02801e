//! The spool directory's lock: one process per directory.
//!
//! Two processes appending to one spool would each scan the segments when
//! they open, write their own cursor and delete segments the other still
//! replays: acknowledged events could be lost or replayed twice. So
//! opening a spool takes an exclusive `flock` on the file `lock` in its
//! directory and holds it for as long as the spool is open. The kernel
//! releases it when the process ends, however it ends (a SIGKILLed server
//! restarts on its own spool at once). The holder writes its pid into the
//! file, so the one refused can say who holds it.
//!
//! `flock` is advisory and per open file: a second open in the same
//! process is refused too. It does not work across machines on every
//! network filesystem; a spool belongs on a local disk anyway (it is
//! fsync'd on every commit).

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read as _, Seek as _, Write as _};
use std::path::Path;

use super::SpoolError;

/// The name of the lock file inside a spool directory.
pub const LOCK_FILE: &str = "lock";

/// Held while a spool is open; dropping it releases the directory.
#[derive(Debug)]
pub(super) struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the directory's lock, or says who holds it.
    pub(super) fn acquire(dir: &Path) -> Result<Self, SpoolError> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(LOCK_FILE))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let holder = file
                    .read_to_string(&mut text)
                    .ok()
                    .and_then(|_| text.trim().parse().ok());
                return Err(SpoolError::Locked {
                    dir: dir.to_owned(),
                    holder,
                });
            }
            Err(TryLockError::Error(error)) => return Err(error.into()),
        }
        file.set_len(0)?;
        file.rewind()?;
        file.write_all(std::process::id().to_string().as_bytes())?;
        Ok(Self { _file: file })
    }
}
