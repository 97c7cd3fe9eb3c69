//! The serial console's output, written by a thread of its own rather
//! than by the vCPU that printed it.
//!
//! Writing to a pipe wakes its reader "synchronously": the kernel queues
//! the reader on the writer's CPU, expecting the writer to sleep soon. A
//! vCPU thread does not: it goes back into KVM_RUN, and on a host kernel
//! without preemption (and a software KVM that emulates long stretches
//! of guest kernel code) the reader then waited up to 3.5 ms for that
//! CPU while the other one idled (seen with `perf sched` on kvm_pvm,
//! in one restore of three). The writer thread does sleep right after
//! its write, so the reader runs at once.
//!
//! The writer may be queued on the vCPU's CPU all the same (the
//! scheduler keeps a wakee near its waker), so at the end of each line
//! the vCPU thread yields its CPU once: the writer, and the reader after
//! it, run there before the guest goes on.
//!
//! It also batches: the guest's UART sends a byte per port write, and
//! each used to be a write(2) of one byte (vm-superio flushes after every
//! byte) that woke the reader for one byte. Now a line goes out in one
//! write, and a partial line (a shell prompt) after at most [`GATHER`].
//!
//! The vCPU blocks only when [`LIMIT`] bytes are waiting, as it did before
//! when the pipe was full: no output is dropped.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Bytes waiting for the writer beyond which the vCPU waits.
const LIMIT: usize = 1 << 20;
/// How long the writer waits for a line in progress to end.
const GATHER: Duration = Duration::from_millis(1);

/// What the vCPU and the writer share.
struct Shared {
    queue: Mutex<Queue>,
    changed: Condvar,
    sink: Mutex<Box<dyn Write + Send>>,
}

#[derive(Default)]
struct Queue {
    bytes: Vec<u8>,
    /// The writer holds bytes taken from `bytes` that are not out yet.
    writing: bool,
    /// The writer thread is running.
    attached: bool,
    /// The vCPU's end is gone: write what is left and stop.
    closed: bool,
    /// What the writer is waiting for, so that the vCPU wakes it only
    /// when that comes.
    waiting: Waiting,
    /// Write out now, whole line or not (a drain waits).
    urgent: bool,
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Waiting {
    /// Not waiting: busy, or about to look at the queue.
    #[default]
    No,
    /// Any byte.
    Bytes,
    /// The end of the line in the queue.
    LineEnd,
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, q: MutexGuard<'a, Queue>) -> MutexGuard<'a, Queue> {
        self.changed.wait(q).unwrap_or_else(|e| e.into_inner())
    }

    fn wait_for<'a>(&self, q: MutexGuard<'a, Queue>, d: Duration) -> MutexGuard<'a, Queue> {
        match self.changed.wait_timeout(q, d) {
            Ok((q, _)) => q,
            Err(e) => e.into_inner().0,
        }
    }

    fn write_out(&self, bytes: &[u8]) {
        let mut sink = self.sink.lock().unwrap_or_else(|e| e.into_inner());
        // A console that cannot be written (a closed pipe) loses its
        // output, as a direct write would; the guest is not stopped.
        let _ = sink.write_all(bytes);
        let _ = sink.flush();
    }

    /// The writer thread: writes whatever is queued until the vCPU's
    /// end is dropped.
    fn run(self: Arc<Self>) {
        let mut q = self.queue();
        loop {
            if q.bytes.is_empty() {
                q.urgent = false;
                self.changed.notify_all();
                if q.closed {
                    break;
                }
                q.waiting = Waiting::Bytes;
                q = self.wait(q);
                q.waiting = Waiting::No;
                continue;
            }
            // Give a line in progress a moment to end: one write for it.
            let deadline = Instant::now() + GATHER;
            while !(q.urgent || q.closed || q.bytes.ends_with(b"\n") || q.bytes.len() >= LIMIT) {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                q.waiting = Waiting::LineEnd;
                q = self.wait_for(q, left);
                q.waiting = Waiting::No;
            }
            let bytes = std::mem::take(&mut q.bytes);
            q.writing = true;
            drop(q);
            self.write_out(&bytes);
            q = self.queue();
            q.writing = false;
            self.changed.notify_all();
        }
        q.attached = false;
    }
}

/// The vCPU's end: a `Write` that queues for the writer thread.
pub struct ConsoleWriter {
    shared: Arc<Shared>,
}

impl ConsoleWriter {
    /// Starts a writer thread for `sink`. Without one (no thread could be
    /// started) output is written directly.
    pub fn start(sink: Box<dyn Write + Send>) -> Self {
        let w = Self::direct(sink);
        w.shared.queue().attached = true;
        let worker = w.shared.clone();
        if crate::spare_thread::spawn("serial-out", "vmm", move || worker.run()).is_err() {
            w.shared.queue().attached = false;
        }
        w
    }

    /// Writes to `sink` on the caller's thread (for output thrown away).
    pub fn direct(sink: Box<dyn Write + Send>) -> Self {
        Self {
            shared: Arc::new(Shared {
                queue: Mutex::new(Queue::default()),
                changed: Condvar::new(),
                sink: Mutex::new(sink),
            }),
        }
    }

    /// Returns once everything queued is written (at exit).
    pub fn drain(&mut self) {
        let mut q = self.shared.queue();
        q.urgent = true;
        self.shared.changed.notify_all();
        while q.attached && (q.writing || !q.bytes.is_empty()) {
            q = self.shared.wait(q);
        }
        if !q.bytes.is_empty() {
            let bytes = std::mem::take(&mut q.bytes);
            drop(q);
            self.shared.write_out(&bytes);
        }
    }
}

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut q = self.shared.queue();
        if !q.attached {
            drop(q);
            self.shared.write_out(buf);
            return Ok(buf.len());
        }
        while q.bytes.len() >= LIMIT && q.attached {
            q = self.shared.wait(q);
        }
        q.bytes.extend_from_slice(buf);
        let line_end = buf.ends_with(b"\n");
        let wake = match q.waiting {
            Waiting::Bytes => true,
            Waiting::LineEnd => line_end || q.bytes.len() >= LIMIT,
            Waiting::No => false,
        };
        if wake {
            q.waiting = Waiting::No;
            self.shared.changed.notify_all();
        }
        drop(q);
        if line_end {
            std::thread::yield_now();
        }
        Ok(buf.len())
    }

    /// Nothing to do: queued bytes are on their way already. (The UART
    /// flushes after every byte; waiting here would cost a thread switch
    /// per byte. [`ConsoleWriter::drain`] waits.)
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ConsoleWriter {
    fn drop(&mut self) {
        self.drain();
        self.shared.queue().closed = true;
        self.shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink whose bytes the test can read, from another thread.
    #[derive(Clone, Default)]
    struct Collect(Arc<Mutex<Vec<u8>>>);

    impl Write for Collect {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn everything_written_is_out_after_flush_in_order() {
        let out = Collect::default();
        let mut w = ConsoleWriter::start(Box::new(out.clone()));
        let mut expected = Vec::new();
        for i in 0..2000 {
            let line = format!("line {i}\n");
            w.write_all(line.as_bytes()).unwrap();
            expected.extend_from_slice(line.as_bytes());
        }
        w.drain();
        assert_eq!(*out.0.lock().unwrap(), expected);
    }

    #[test]
    fn a_partial_line_comes_out_without_a_drain() {
        let out = Collect::default();
        let mut w = ConsoleWriter::start(Box::new(out.clone()));
        // A prompt without a newline, a byte at a time as the UART sends.
        for b in b"login: " {
            w.write_all(&[*b]).unwrap();
            w.flush().unwrap();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while out.0.lock().unwrap().len() < 7 {
            assert!(
                std::time::Instant::now() < deadline,
                "the prompt never came out whole"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(*out.0.lock().unwrap(), b"login: ");
    }
}
