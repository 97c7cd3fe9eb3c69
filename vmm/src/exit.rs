//! Why a VM ended, and how the reason reaches the main thread.
//!
//! Devices (reset registers, ACPI PM, debug-exit) and vCPU threads report an
//! end of the VM through an [`ExitSender`]; the main thread waits on the other
//! end, prints one line saying why and exits with the matching status.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// The guest or the VMM ended the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// ACPI S5 soft-off.
    PowerOff,
    /// A reset request; the string names the mechanism. tern does not reboot
    /// a guest: like Firecracker, a reset ends the process with status 0.
    Reset(&'static str),
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN), which x86 treats as a reset.
    TripleFault,
    /// The guest wrote this value to the debug-exit port.
    DebugExit(u8),
    /// The VM moved to another tern (a live migration completed).
    Migrated(String),
    /// A vCPU stopped on something tern cannot continue from.
    VcpuError {
        /// Index of the vCPU.
        vcpu: u32,
        /// What happened, including the exit reason and guest RIP.
        message: String,
    },
    /// Guest memory could not be brought in from a snapshot's memory file
    /// (a lazy restore's fill failed): the guest cannot go on.
    MemoryFill(String),
}

/// Process status for a VMM-side failure (bad input, KVM error, guest
/// emulation failure).
pub const ERROR_STATUS: i32 = 2;

impl ExitReason {
    /// The process exit status for this reason: 0 for a clean power-off or
    /// reset, `(V << 1) | 1` for debug-exit value V (QEMU's isa-debug-exit
    /// convention), [`ERROR_STATUS`] for errors.
    pub fn status(&self) -> i32 {
        match self {
            ExitReason::PowerOff
            | ExitReason::Reset(_)
            | ExitReason::TripleFault
            | ExitReason::Migrated(_) => 0,
            ExitReason::DebugExit(v) => (i32::from(*v) << 1) | 1,
            ExitReason::VcpuError { .. } | ExitReason::MemoryFill(_) => ERROR_STATUS,
        }
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::PowerOff => write!(f, "guest powered off (ACPI S5)"),
            ExitReason::Reset(how) => write!(f, "guest requested a reset ({how})"),
            ExitReason::TripleFault => write!(f, "guest triple-faulted (treated as reset)"),
            ExitReason::DebugExit(v) => {
                write!(f, "guest wrote {v:#x} to the debug-exit port")
            }
            ExitReason::Migrated(to) => write!(f, "the VM migrated to {to}"),
            ExitReason::VcpuError { vcpu, message } => write!(f, "vCPU {vcpu} failed: {message}"),
            ExitReason::MemoryFill(why) => {
                write!(f, "guest memory could not be restored: {why}")
            }
        }
    }
}

/// Sending side, cloned into every device and vCPU thread that can end the VM.
#[derive(Clone, Debug)]
pub struct ExitSender {
    tx: Sender<ExitReason>,
    stopping: Arc<AtomicBool>,
    wake: Arc<EventFd>,
}

impl ExitSender {
    /// Reports an end of the VM and tells every vCPU to stop running the
    /// guest. Only the first report counts; later ones (another vCPU racing
    /// the first) are ignored by the receiver.
    pub fn send(&self, reason: ExitReason) {
        self.stopping.store(true, Ordering::SeqCst);
        // The receiver lives as long as the VM; if it is gone the process is
        // already exiting and there is nobody left to tell.
        let _ = self.tx.send(reason);
        // Wake the VMM thread's event loop; if the eventfd counter is full
        // it is already awake.
        let _ = self.wake.write(1);
    }

    /// Whether the VM is ending: vCPUs check this after each exit so the
    /// guest runs no further once it asked to stop.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
}

/// The VMM thread's end: an eventfd to poll and the reasons behind it.
pub struct ExitReceiver {
    /// Readable once an exit was reported.
    pub event: EventFd,
    /// The reasons, first one first.
    pub reasons: Receiver<ExitReason>,
}

/// Creates the channel that carries exit reasons to the VMM thread.
pub fn exit_channel() -> std::io::Result<(ExitSender, ExitReceiver)> {
    let (tx, rx) = channel();
    let event = EventFd::new(libc::EFD_NONBLOCK)?;
    let wake = Arc::new(event.try_clone()?);
    Ok((
        ExitSender {
            tx,
            stopping: Arc::new(AtomicBool::new(false)),
            wake,
        },
        ExitReceiver { event, reasons: rx },
    ))
}

/// A `vm_superio::Trigger` that ends the VM with a fixed reason (used for the
/// i8042 reset line).
pub struct ExitTrigger {
    sender: ExitSender,
    reason: ExitReason,
}

impl ExitTrigger {
    /// A trigger that sends `reason` when fired.
    pub fn new(sender: ExitSender, reason: ExitReason) -> Self {
        Self { sender, reason }
    }
}

impl vm_superio::Trigger for ExitTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.sender.send(self.reason.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_isa_debug_exit() {
        assert_eq!(ExitReason::DebugExit(0).status(), 1);
        assert_eq!(ExitReason::DebugExit(3).status(), 7);
        assert_eq!(ExitReason::DebugExit(0x7f).status(), 255);
        assert_eq!(ExitReason::PowerOff.status(), 0);
        assert_eq!(ExitReason::Reset("i8042").status(), 0);
    }
}
