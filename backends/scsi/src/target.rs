//! Target 0 of the controller: its LUNs by number, which change while the
//! controller runs when LUNs are hot added or removed (see
//! [`crate::hotplug`]).

use std::sync::{Arc, RwLock};

use crate::lun::{decode_lun, encode_lun, Lun, MAX_LUNS};

/// Why a LUN could not be added to or removed from the target.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// The number is past what the controller addresses.
    #[error("LUN {0} is out of range (0-{max})", max = MAX_LUNS - 1)]
    OutOfRange(u16),
    /// Another unit has that number.
    #[error("LUN {0} exists")]
    Taken(u16),
    /// No unit has that number.
    #[error("LUN {0} does not exist")]
    Missing(u16),
}

/// Target 0 and its LUNs. A LUN's number is its index; LUNs may be added
/// and removed while the controller runs (hot plug), which leaves holes.
/// Commands take a reference to their unit, so a removed unit is dropped
/// once its last command in flight completes.
pub struct Target {
    luns: RwLock<Vec<Option<Arc<Lun>>>>,
}

impl Target {
    /// A target with `luns` (at most [`MAX_LUNS`]; index = LUN number).
    pub fn new(luns: Vec<Arc<Lun>>) -> Self {
        Self::sparse(luns.into_iter().map(Some).collect())
    }

    /// A target whose LUN n is `luns[n]`, absent where it is `None`.
    pub fn sparse(luns: Vec<Option<Arc<Lun>>>) -> Self {
        Target {
            luns: RwLock::new(luns),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Option<Arc<Lun>>>> {
        // A panic while holding the lock cannot leave the list half-changed
        // (every change is one assignment), so a poisoned lock is usable.
        self.luns.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The LUNs present now, in LUN order.
    pub fn luns(&self) -> Vec<Arc<Lun>> {
        self.read().iter().flatten().cloned().collect()
    }

    /// The LUNs present now with their numbers, ascending.
    pub fn entries(&self) -> Vec<(u16, Arc<Lun>)> {
        self.read()
            .iter()
            .enumerate()
            .filter_map(|(i, l)| Some((i as u16, l.clone()?)))
            .collect()
    }

    /// The numbers of the LUNs present now, ascending.
    pub fn numbers(&self) -> Vec<u16> {
        self.read()
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_some())
            .map(|(i, _)| i as u16)
            .collect()
    }

    /// Puts `unit` at LUN `number` (the unit was made with that number).
    pub fn add(&self, number: u16, unit: Arc<Lun>) -> Result<(), TargetError> {
        let i = usize::from(number);
        if i >= MAX_LUNS {
            return Err(TargetError::OutOfRange(number));
        }
        let mut luns = self.luns.write().unwrap_or_else(|e| e.into_inner());
        if luns.len() <= i {
            luns.resize(i + 1, None);
        }
        if luns[i].is_some() {
            return Err(TargetError::Taken(number));
        }
        luns[i] = Some(unit);
        Ok(())
    }

    /// Takes LUN `number` away; commands already running on it finish.
    pub fn remove(&self, number: u16) -> Result<Arc<Lun>, TargetError> {
        let mut luns = self.luns.write().unwrap_or_else(|e| e.into_inner());
        let unit = luns
            .get_mut(usize::from(number))
            .and_then(Option::take)
            .ok_or(TargetError::Missing(number))?;
        while luns.last().is_some_and(Option::is_none) {
            luns.pop();
        }
        Ok(unit)
    }

    /// The unit a virtio-scsi LUN field addresses: byte 0 is 1, byte 1 the
    /// target (only 0 exists), bytes 2-3 the LUN in flat (01b) or
    /// peripheral (00b) addressing, bytes 4-7 zero (single level).
    pub fn lookup(&self, lun: &[u8; 8]) -> Option<Arc<Lun>> {
        let n = decode_lun(lun)?;
        self.read().get(usize::from(n)).cloned().flatten()
    }

    /// REPORT LUNS parameter data (not truncated): every LUN for SELECT
    /// REPORT 0 and 2; none for 1 (we have no well-known LUNs).
    pub fn report_luns(&self, select: u8) -> Vec<u8> {
        let numbers = if select == 1 {
            Vec::new()
        } else {
            self.numbers()
        };
        let mut v = Vec::with_capacity(8 + 8 * numbers.len());
        v.extend_from_slice(&((8 * numbers.len()) as u32).to_be_bytes());
        v.extend_from_slice(&[0; 4]);
        for lun in numbers {
            v.extend_from_slice(&encode_lun(lun));
        }
        v
    }
}
