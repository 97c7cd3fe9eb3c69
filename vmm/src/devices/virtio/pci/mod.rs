//! The modern virtio-pci transport (virtio 1.2 §4.1): a PCI function whose
//! BAR 0 holds the common, ISR, device-config and notify structures and the
//! MSI-X table and PBA. Queue notifications are KVM ioeventfds on the notify
//! addresses; with MSI-X, a queue's interrupts are KVM irqfds on MSI routes,
//! so the backend signals the guest without tern; without MSI-X, tern relays
//! them as INTx (IOAPIC pin from the DSDT's `_PRT`) with the ISR register.

pub mod common_cfg;
pub mod intx;
pub mod msix;
pub mod persist;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{ActiveQueue, VirtioDevice};
use crate::devices::bus::{Bus, BusDevice};
use crate::kvm::irq::GsiRouter;
use crate::machine::q35::pci_bus::{reg, ConfigSpace, PciFunction};
use common_cfg::{status, CommonCfg, Effect, NO_VECTOR};
use intx::IntxRelay;
use msix::MsixTable;

/// Red Hat's PCI vendor ID, which virtio uses.
pub const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
/// Modern device IDs are 0x1040 + the virtio device type.
pub const VIRTIO_PCI_DEVICE_BASE: u16 = 0x1040;

/// BAR 0 layout: one page per structure.
const COMMON_OFFSET: u64 = 0x0000;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_CFG_OFFSET: u64 = 0x2000;
const DEVICE_CFG_SIZE: u64 = 0x1000;
const NOTIFY_OFFSET: u64 = 0x3000;
const NOTIFY_SIZE: u64 = 0x1000;
/// Each queue notifies at its own 4-byte slot.
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x5000;
/// BAR 0's size (a power of two).
pub const BAR_SIZE: u64 = 0x8000;

/// Capability offsets in config space.
const CAP_MSIX: u16 = 0x40;
const CAP_COMMON: u16 = 0x50;
const CAP_NOTIFY: u16 = 0x60;
const CAP_ISR: u16 = 0x74;
const CAP_DEVICE: u16 = 0x84;
const CAP_PCI_CFG: u16 = 0x94;

const PCI_CAP_ID_MSIX: u8 = 0x11;
const PCI_CAP_ID_VNDR: u8 = 0x09;
const BAR0: u16 = 0x10;
const STATUS_CAP_LIST: u16 = 0x10;
const COMMAND_INTX_DISABLE: u16 = 1 << 10;
const MSIX_ENABLE: u16 = 1 << 15;
const MSIX_FUNCTION_MASK: u16 = 1 << 14;

/// What the transport needs from the VM.
#[derive(Clone)]
pub struct PciEnv {
    /// The VM (ioeventfds, irqfds).
    pub vm: Arc<VmFd>,
    /// The MMIO bus the BAR lives on.
    pub mmio: Arc<Bus>,
    /// MSI routes.
    pub router: Arc<GsiRouter>,
    /// Guest memory (for the device's rings).
    pub mem: GuestMemoryMmap,
}

/// Errors creating the transport.
#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    /// An eventfd could not be created or registered.
    #[error("virtio-pci {what}: {err}")]
    Kvm {
        /// What.
        what: &'static str,
        /// Error.
        err: std::io::Error,
    },
    /// The BAR could not be mapped.
    #[error("virtio-pci BAR: {0}")]
    Bus(#[from] crate::devices::bus::BusError),
    /// The backend cannot log dirty pages.
    #[error("dirty page tracking: {0}")]
    Log(String),
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VirtioPciError {
    move |e| VirtioPciError::Kvm {
        what,
        err: std::io::Error::from_raw_os_error(e.errno()),
    }
}

/// How the device's queues interrupt the guest right now.
enum Interrupts {
    /// Not active.
    None,
    /// MSI-X: (queue, vector, gsi) bound as irqfds.
    Msix(Vec<(usize, u16, u32)>),
    /// INTx relayed by tern.
    Intx(IntxRelay),
}

/// A virtio device on the PCI bus.
pub struct VirtioPciDevice {
    config: ConfigSpace,
    bar: u64,
    common: CommonCfg,
    isr: Arc<AtomicU8>,
    msix: MsixTable,
    device: Box<dyn VirtioDevice>,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    intx_gsi: u32,
    interrupts: Interrupts,
    env: PciEnv,
    me: Weak<Mutex<VirtioPciDevice>>,
    /// Ring positions of a restored device whose backend must not start
    /// yet (guest memory is still being filled in, `snapshot/lazy.rs`).
    held: Option<Vec<(usize, u16)>>,
}

fn vendor_cap(
    cs: &mut ConfigSpace,
    at: u16,
    next: u16,
    cfg_type: u8,
    offset: u64,
    length: u64,
    extra: &[u8],
) {
    let len = 16 + extra.len() as u8;
    cs.set(
        at,
        &[PCI_CAP_ID_VNDR, next as u8, len, cfg_type, 0, 0, 0, 0],
    );
    cs.set_u32(at + 8, offset as u32);
    cs.set_u32(at + 12, length as u32);
    cs.set(at + 16, extra);
}

impl VirtioPciDevice {
    /// Puts `device` behind a virtio-pci function with its BAR at `bar`,
    /// interrupting on `intx_gsi` when MSI-X is off. Returns the shared
    /// handle that the PCI bus and the MMIO bus both hold.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        bar: u64,
        intx_gsi: u32,
        env: PciEnv,
    ) -> Result<Arc<Mutex<Self>>, VirtioPciError> {
        let num_queues = device.num_queues();
        // One vector per queue and one for config changes.
        let vectors = (num_queues + 1).min(256) as u16;
        let class = match device.device_type() {
            1 => 0x02_00_00, // network controller
            8 => 0x01_00_00, // SCSI storage controller
            _ => 0x01_80_00, // mass storage, other
        };
        let mut cs = ConfigSpace::new_type0(
            VIRTIO_PCI_VENDOR,
            VIRTIO_PCI_DEVICE_BASE + device.device_type(),
            class,
            1,
        );
        cs.set_u16(reg::SUBSYSTEM_VENDOR_ID, VIRTIO_PCI_VENDOR);
        cs.set_u16(reg::SUBSYSTEM_ID, 0x40);
        cs.set_u16(0x06, STATUS_CAP_LIST);
        cs.set(0x34, &[CAP_MSIX as u8]);
        // BAR 0: 32-bit memory, non-prefetchable; the guest may move it.
        cs.set_u32(BAR0, bar as u32);
        cs.set_writable(BAR0, &((!(BAR_SIZE as u32 - 1)) & !0xf).to_le_bytes());
        cs.set_writable(reg::COMMAND, &[0x06, 0x04]);
        // INTx pin A, line = the GSI the _PRT gives this slot.
        cs.set(reg::INTERRUPT_LINE, &[intx_gsi as u8, 1]);
        // MSI-X: message control (table size - 1; enable and mask writable),
        // table and PBA in BAR 0.
        cs.set(CAP_MSIX, &[PCI_CAP_ID_MSIX, CAP_COMMON as u8]);
        cs.set_u16(CAP_MSIX + 2, vectors - 1);
        cs.set_writable(
            CAP_MSIX + 2,
            &(MSIX_ENABLE | MSIX_FUNCTION_MASK).to_le_bytes(),
        );
        cs.set_u32(CAP_MSIX + 4, MSIX_TABLE_OFFSET as u32);
        cs.set_u32(CAP_MSIX + 8, MSIX_PBA_OFFSET as u32);
        vendor_cap(
            &mut cs,
            CAP_COMMON,
            CAP_NOTIFY,
            1,
            COMMON_OFFSET,
            common_cfg::reg::SIZE,
            &[],
        );
        vendor_cap(
            &mut cs,
            CAP_NOTIFY,
            CAP_ISR,
            2,
            NOTIFY_OFFSET,
            NOTIFY_SIZE,
            &NOTIFY_MULTIPLIER.to_le_bytes(),
        );
        vendor_cap(&mut cs, CAP_ISR, CAP_DEVICE, 3, ISR_OFFSET, 1, &[]);
        vendor_cap(
            &mut cs,
            CAP_DEVICE,
            CAP_PCI_CFG,
            4,
            DEVICE_CFG_OFFSET,
            DEVICE_CFG_SIZE,
            &[],
        );
        // The PCI configuration access capability the spec requires; its
        // window is not implemented (reads 0), which drivers that use BAR
        // mappings never notice.
        vendor_cap(&mut cs, CAP_PCI_CFG, 0, 5, 0, 0, &[0; 4]);

        let common = CommonCfg::new(
            device.features(),
            num_queues,
            device.queue_max_size(),
            vectors,
        );
        let mut kicks = Vec::with_capacity(num_queues);
        let mut calls = Vec::with_capacity(num_queues);
        for _ in 0..num_queues {
            kicks.push(
                EventFd::new(libc::EFD_NONBLOCK).map_err(|err| VirtioPciError::Kvm {
                    what: "eventfd",
                    err,
                })?,
            );
            calls.push(
                EventFd::new(libc::EFD_NONBLOCK).map_err(|err| VirtioPciError::Kvm {
                    what: "eventfd",
                    err,
                })?,
            );
        }
        let dev = Arc::new_cyclic(|me| {
            Mutex::new(Self {
                config: cs,
                bar: 0,
                common,
                isr: Arc::new(AtomicU8::new(0)),
                msix: MsixTable::new(vectors),
                device,
                kicks,
                calls,
                intx_gsi,
                interrupts: Interrupts::None,
                env,
                me: me.clone(),
                held: None,
            })
        });
        crate::devices::bus::lock(&dev).map_bar(bar)?;
        Ok(dev)
    }

    /// Reconnects a device whose backend went away, if a new backend
    /// listens; a running device's rings resume at their used index.
    pub fn try_reconnect(&mut self) -> bool {
        // A held device's rings start when it is released, not now.
        let running = self.running() && self.held.is_none();
        let mem = self.env.mem.clone();
        // Every running ring resumes at its used index.
        let queues = Self::active_queues(&self.common, &self.kicks, &self.calls, &mem, &[]);
        let active = running.then_some((self.common.driver_features, queues.as_slice()));
        match self.device.reconnect(&self.env.mem, active) {
            Ok(done) => {
                if done && running {
                    // Wake the new backend for anything queued meanwhile.
                    for k in &self.kicks {
                        let _ = k.write(1);
                    }
                }
                done
            }
            Err(e) => {
                log::warn!(
                    "virtio device {:#x}: reconnect failed: {e}",
                    self.device.device_type()
                );
                false
            }
        }
    }

    /// The device's state for `GET /devices`.
    pub fn state(&self) -> &'static str {
        self.device.state()
    }

    /// Whether the guest's driver has set DRIVER_OK (it has the device
    /// running; the end of a hot plug's `plugging`).
    pub fn driver_ok(&self) -> bool {
        self.common.status & status::DRIVER_OK != 0
    }

    /// Who serves the device.
    pub fn backend(&self) -> Option<String> {
        self.device.backend()
    }

    /// Where BAR 0 is mapped now (the guest may have moved it).
    pub fn bar(&self) -> u64 {
        self.bar
    }

    /// Takes the function off the machine (hot unplug): the backend's rings
    /// stop, interrupts (irqfds, MSI routes) are released, and BAR 0 and its
    /// notify ioeventfds are unmapped. The backend itself stops when the
    /// device is dropped.
    pub fn detach(&mut self) {
        self.reset();
        if let Err(e) = self.map_bar(0) {
            log::warn!("virtio-pci: unmapping BAR 0: {e}");
        }
    }

    /// The managed backend's process ID (it changes when a dead backend
    /// is restarted).
    pub fn backend_pid(&self) -> Option<u32> {
        self.device.backend_pid()
    }

    /// The virtio device type.
    pub fn device_type(&self) -> u16 {
        self.device.device_type()
    }

    /// Maps BAR 0 at `addr`: the MMIO range and the notify ioeventfds.
    fn map_bar(&mut self, addr: u64) -> Result<(), VirtioPciError> {
        if addr == self.bar {
            return Ok(());
        }
        if self.bar != 0 {
            self.env.mmio.remove(self.bar);
            for (i, k) in self.kicks.iter().enumerate() {
                let at = IoEventAddress::Mmio(
                    self.bar + NOTIFY_OFFSET + i as u64 * u64::from(NOTIFY_MULTIPLIER),
                );
                let _ = self.env.vm.unregister_ioevent(k, &at, NoDatamatch);
            }
        }
        self.bar = addr;
        if addr == 0 {
            return Ok(());
        }
        if let Some(me) = self.me.upgrade() {
            self.env.mmio.insert(me, addr, BAR_SIZE)?;
        }
        for (i, k) in self.kicks.iter().enumerate() {
            let at = IoEventAddress::Mmio(
                addr + NOTIFY_OFFSET + i as u64 * u64::from(NOTIFY_MULTIPLIER),
            );
            self.env
                .vm
                .register_ioevent(k, &at, NoDatamatch)
                .map_err(kvm_err("KVM_IOEVENTFD"))?;
        }
        Ok(())
    }

    fn msix_control(&self) -> u16 {
        let mut b = [0u8; 2];
        self.config.peek(CAP_MSIX + 2, &mut b);
        u16::from_le_bytes(b)
    }

    fn msix_enabled(&self) -> bool {
        let c = self.msix_control();
        c & MSIX_ENABLE != 0 && c & MSIX_FUNCTION_MASK == 0
    }

    fn intx_disabled(&self) -> bool {
        let mut b = [0u8; 2];
        self.config.peek(reg::COMMAND, &mut b);
        u16::from_le_bytes(b) & COMMAND_INTX_DISABLE != 0
    }

    fn activate(&mut self) {
        // Interrupts first: the backend may complete a request as soon as
        // its rings start.
        let wiring = if self.msix_enabled() {
            self.bind_msix()
        } else {
            self.start_intx()
        };
        let queues: Vec<ActiveQueue> = self
            .common
            .queues
            .iter()
            .enumerate()
            .filter(|(_, q)| q.enabled)
            .map(|(i, q)| ActiveQueue {
                index: i,
                size: q.size,
                max_size: q.max_size,
                desc: q.desc,
                avail: q.avail,
                used: q.used,
                kick: &self.kicks[i],
                call: &self.calls[i],
                base: 0,
            })
            .collect();
        let result = wiring.and_then(|()| {
            self.device
                .activate(&self.env.mem, self.common.driver_features, &queues)
                .map_err(|e| e.to_string())
        });
        drop(queues);
        if let Err(e) = result {
            if self.device.state() == "disconnected" {
                // The backend is gone: keep the driver's setup; the device
                // starts when a backend reconnects (try_reconnect).
                log::warn!(
                    "virtio device {:#x}: backend gone at DRIVER_OK, waiting for it: {e}",
                    self.device.device_type()
                );
            } else {
                log::error!(
                    "virtio device {:#x} failed to activate: {e}",
                    self.device.device_type()
                );
                self.common.status |= status::DEVICE_NEEDS_RESET;
            }
        }
    }

    /// Routes each enabled queue's vector and binds its call eventfd.
    fn bind_msix(&mut self) -> Result<(), String> {
        let mut bound = Vec::new();
        for (i, q) in self.common.queues.iter().enumerate() {
            if !q.enabled || q.msix_vector == NO_VECTOR {
                continue;
            }
            let gsi = self.env.router.allocate().map_err(|e| e.to_string())?;
            if let Some(e) = self.msix.entry(q.msix_vector) {
                if !e.masked() && e.address != 0 {
                    self.env
                        .router
                        .set_msi(gsi, e.address, e.data)
                        .map_err(|e| e.to_string())?;
                }
            }
            self.env
                .vm
                .register_irqfd(&self.calls[i], gsi)
                .map_err(|e| e.to_string())?;
            bound.push((i, q.msix_vector, gsi));
        }
        self.interrupts = Interrupts::Msix(bound);
        Ok(())
    }

    fn start_intx(&mut self) -> Result<(), String> {
        let calls: Vec<EventFd> = self
            .common
            .queues
            .iter()
            .enumerate()
            .filter(|(_, q)| q.enabled)
            .filter_map(|(i, _)| self.calls[i].try_clone().ok())
            .collect();
        let relay = IntxRelay::start(
            &self.env.vm,
            self.intx_gsi,
            calls,
            self.isr.clone(),
            self.intx_disabled(),
        )
        .map_err(|e| e.to_string())?;
        self.interrupts = Interrupts::Intx(relay);
        Ok(())
    }

    fn stop_interrupts(&mut self) {
        match std::mem::replace(&mut self.interrupts, Interrupts::None) {
            Interrupts::None => {}
            Interrupts::Msix(bound) => {
                for (q, _, gsi) in bound {
                    let _ = self.env.vm.unregister_irqfd(&self.calls[q], gsi);
                    let _ = self.env.router.release(gsi);
                }
            }
            Interrupts::Intx(relay) => relay.stop(&self.env.vm),
        }
    }

    fn reset(&mut self) {
        self.held = None;
        if self.common.status & status::DRIVER_OK != 0 {
            self.device.reset();
        }
        self.stop_interrupts();
        for c in &self.calls {
            let _ = c.read();
        }
        self.common.reset();
        self.isr.store(0, Ordering::SeqCst);
    }

    /// A vector's table entry changed: follow it in the routes.
    fn msix_entry_changed(&mut self, vector: u16) {
        let Interrupts::Msix(bound) = &self.interrupts else {
            return;
        };
        let Some(e) = self.msix.entry(vector) else {
            return;
        };
        for &(_, v, gsi) in bound.iter().filter(|(_, v, _)| *v == vector) {
            let _ = v;
            let r = if e.masked() || e.address == 0 {
                self.env.router.clear_msi(gsi)
            } else {
                self.env.router.set_msi(gsi, e.address, e.data)
            };
            if let Err(err) = r {
                log::warn!("virtio-pci: MSI-X vector {vector}: {err}");
            }
        }
    }
}

impl PciFunction for VirtioPciDevice {
    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read_config(offset, data);
    }

    fn write_config(&mut self, offset: u16, data: &[u8]) {
        self.config.write_config(offset, data);
        if (BAR0..BAR0 + 4).contains(&offset) {
            let mut b = [0u8; 4];
            self.config.peek(BAR0, &mut b);
            let addr = u64::from(u32::from_le_bytes(b) & !0xf);
            // All-ones is the guest sizing the BAR, not moving it.
            if addr != u64::from(!(BAR_SIZE as u32 - 1) & !0xf) {
                if let Err(e) = self.map_bar(addr) {
                    log::warn!("virtio-pci: cannot move BAR 0 to {addr:#x}: {e}");
                }
            }
        }
        if let Interrupts::Intx(relay) = &self.interrupts {
            relay.set_disabled(self.intx_disabled());
        }
    }
}

impl BusDevice for VirtioPciDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            o if o < ISR_OFFSET => self.common.read(o - COMMON_OFFSET, data),
            o if o < DEVICE_CFG_OFFSET => {
                data.fill(0);
                if o == ISR_OFFSET {
                    // Reading the ISR acknowledges it.
                    data[0] = self.isr.swap(0, Ordering::SeqCst);
                }
            }
            o if o < NOTIFY_OFFSET => self.device.read_config(o - DEVICE_CFG_OFFSET, data),
            o if o < MSIX_TABLE_OFFSET => data.fill(0),
            o if o < MSIX_PBA_OFFSET => self.msix.read(o - MSIX_TABLE_OFFSET, data),
            _ => data.fill(0), // no pending bits: masked vectors drop interrupts
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if o < ISR_OFFSET => match self.common.write(o - COMMON_OFFSET, data) {
                Effect::None => {}
                Effect::Reset => self.reset(),
                Effect::Activate => self.activate(),
            },
            o if o < DEVICE_CFG_OFFSET => {}
            o if o < NOTIFY_OFFSET => self.device.write_config(o - DEVICE_CFG_OFFSET, data),
            // Notifications go to the ioeventfds; a write that reaches here
            // (a width KVM did not match) is relayed by hand.
            o if o < MSIX_TABLE_OFFSET => {
                let q = ((o - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                if let Some(k) = self.kicks.get(q) {
                    let _ = k.write(1);
                }
            }
            o if o < MSIX_PBA_OFFSET => {
                if let Some(v) = self.msix.write(o - MSIX_TABLE_OFFSET, data) {
                    self.msix_entry_changed(v);
                }
            }
            _ => {}
        }
    }
}
