//! INTx for a virtio-pci function whose driver did not enable MSI-X: a
//! thread waits on the queues' call eventfds, sets the ISR's queue bit and
//! asserts the function's IOAPIC pin through a resampling irqfd, asserting
//! again at EOI while the guest has not read (acknowledged) the ISR.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

/// ISR bit: a queue has used buffers.
const ISR_QUEUE: u8 = 1;

/// The running relay.
pub struct IntxRelay {
    stop: EventFd,
    line: EventFd,
    gsi: u32,
    disabled: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl IntxRelay {
    /// Starts relaying `calls` to `gsi`.
    pub fn start(
        vm: &VmFd,
        gsi: u32,
        calls: Vec<EventFd>,
        isr: Arc<AtomicU8>,
        disabled: bool,
    ) -> std::io::Result<Self> {
        let line = EventFd::new(libc::EFD_NONBLOCK)?;
        let resample = EventFd::new(libc::EFD_NONBLOCK)?;
        vm.register_irqfd_with_resample(&line, &resample, gsi)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let disabled = Arc::new(AtomicBool::new(disabled));
        let (t_line, t_stop, t_disabled) = (line.try_clone()?, stop.try_clone()?, disabled.clone());
        let thread = crate::spare_thread::spawn(&format!("intx-{gsi}"), "vmm", move || {
            relay(calls, resample, t_line, t_stop, isr, t_disabled)
        })?;
        Ok(Self {
            stop,
            line,
            gsi,
            disabled,
            thread: Some(thread),
        })
    }

    /// Follows the function's INTx-disable command bit.
    pub fn set_disabled(&self, disabled: bool) {
        self.disabled.store(disabled, Ordering::SeqCst);
    }

    /// Stops the thread and unbinds the line.
    pub fn stop(mut self, vm: &VmFd) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = vm.unregister_irqfd(&self.line, self.gsi);
    }
}

fn relay(
    calls: Vec<EventFd>,
    resample: EventFd,
    line: EventFd,
    stop: EventFd,
    isr: Arc<AtomicU8>,
    disabled: Arc<AtomicBool>,
) {
    let mut fds: Vec<libc::pollfd> = calls
        .iter()
        .chain([&resample, &stop])
        .map(|e| libc::pollfd {
            fd: e.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let n_calls = calls.len();
    loop {
        // SAFETY: `fds` is a valid array of pollfd for its whole length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            log::error!(
                "INTx relay: poll failed: {}",
                std::io::Error::last_os_error()
            );
            return;
        }
        if fds[n_calls + 1].revents != 0 {
            return;
        }
        let mut raise = false;
        for (i, call) in calls.iter().enumerate() {
            if fds[i].revents != 0 && call.read().is_ok() {
                isr.fetch_or(ISR_QUEUE, Ordering::SeqCst);
                raise = true;
            }
        }
        // EOI: the line was deasserted; assert again if still unacknowledged.
        if fds[n_calls].revents != 0 && resample.read().is_ok() && isr.load(Ordering::SeqCst) != 0 {
            raise = true;
        }
        if raise && !disabled.load(Ordering::SeqCst) {
            let _ = line.write(1);
        }
        for f in fds.iter_mut() {
            f.revents = 0;
        }
    }
}
