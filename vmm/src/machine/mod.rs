//! The emulated machine: address map, chipset, legacy devices, and the
//! buses that connect them to the vCPUs.

pub mod layout;
pub mod q35;

use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::acpi_pm::AcpiPm;
use crate::devices::bus::{Bus, BusError};
use crate::devices::debug_exit::DebugExit;
use crate::devices::i8042::I8042;
use crate::devices::pci_hotplug::PciHotplug;
use crate::devices::reset_control::ResetControl;
use crate::devices::rtc::Rtc;
use crate::devices::serial::{SerialDevice, SerialOut, SharedSerial};
use crate::devices::sink::Sink;
use crate::exit::{ExitReason, ExitSender, ExitTrigger};
use layout::*;
use q35::chipset;
use q35::config_io::PciConfigIo;
use q35::ecam::Ecam;
use q35::pci_bus::{PciBus, PciBusError, SharedPciBus};

/// Errors assembling the machine.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// Two devices claimed the same range.
    #[error("device layout: {0}")]
    Bus(#[from] BusError),
    /// Two PCI functions claimed the same address.
    #[error("PCI layout: {0}")]
    Pci(#[from] PciBusError),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    /// An irqfd could not be registered.
    #[error("cannot register irqfd for GSI {gsi}: {err}")]
    Irqfd {
        /// The GSI.
        gsi: u32,
        /// KVM error.
        err: kvm_ioctls::Error,
    },
}

/// One device as `GET /devices` reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeviceInfo {
    /// Stable name.
    pub id: String,
    /// What it is.
    pub kind: &'static str,
    /// PCI address (`0000:00:1f.0`) for PCI functions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pci_address: Option<String>,
    /// First I/O port, for port devices.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub io_port: Option<String>,
    /// MMIO base, for memory-mapped devices.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mmio_address: Option<String>,
    /// `attached`, or `disconnected` when its backend went away.
    pub state: &'static str,
    /// The vhost-user socket of the backend serving it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// The managed backend's process ID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_pid: Option<u32>,
    /// A virtio-scsi controller's LUNs: the drive ids, in LUN order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub luns: Option<Vec<String>>,
    /// A virtio-scsi controller's LUNs with their numbers and states.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scsi_luns: Option<Vec<LunInfo>>,
}

/// A LUN of a virtio-scsi controller in `GET /devices`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LunInfo {
    /// The drive id.
    pub id: String,
    /// The LUN number on target 0.
    pub lun: u16,
    /// `plugging` from a hot add until the guest sends the LUN a command,
    /// then `attached`.
    pub state: &'static str,
}

impl DeviceInfo {
    fn port(id: &str, kind: &'static str, port: u16) -> Self {
        Self {
            id: id.into(),
            kind,
            pci_address: None,
            io_port: Some(format!("{port:#x}")),
            mmio_address: None,
            state: "attached",
            backend: None,
            backend_pid: None,
            luns: None,
            scsi_luns: None,
        }
    }

    fn pci(id: &str, kind: &'static str, dev: u8, func: u8) -> Self {
        Self {
            id: id.into(),
            kind,
            pci_address: Some(format!("0000:00:{dev:02x}.{func}")),
            io_port: None,
            mmio_address: None,
            state: "attached",
            backend: None,
            backend_pid: None,
            luns: None,
            scsi_luns: None,
        }
    }
}

/// The assembled machine.
pub struct Machine {
    /// Port I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// COM1, kept for input and for flushing at exit.
    pub serial: SharedSerial,
    /// PCI bus 0.
    pub pci: SharedPciBus,
    /// The keyboard controller, for Ctrl-Alt-Del.
    pub i8042: Arc<Mutex<I8042>>,
    /// The CMOS RTC (snapshots).
    pub rtc: Arc<Mutex<Rtc>>,
    /// The ACPI PM block (snapshots).
    pub acpi_pm: Arc<Mutex<AcpiPm>>,
    /// The PCI hot plug registers.
    pub hotplug: Arc<Mutex<PciHotplug>>,
    /// Signalled when the guest ejects a hot-plugged device.
    pub eject_evt: EventFd,
    /// Every device, for `GET /devices`.
    pub devices: Vec<DeviceInfo>,
}

/// An eventfd wired to `gsi` through KVM's irqfd.
fn irq_line(vm: &VmFd, gsi: u32) -> Result<EventFd, MachineError> {
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(MachineError::EventFd)?;
    vm.register_irqfd(&evt, gsi)
        .map_err(|err| MachineError::Irqfd { gsi, err })?;
    Ok(evt)
}

/// Builds the chipset and legacy devices and maps them on the buses.
pub fn build(vm: &VmFd, exit: &ExitSender, serial_out: SerialOut) -> Result<Machine, MachineError> {
    let pio = Bus::new();
    let mmio = Bus::new();

    let serial = Arc::new(Mutex::new(SerialDevice::new(
        irq_line(vm, COM1_IRQ)?,
        serial_out,
    )));
    pio.insert(serial.clone(), u64::from(COM1_PORT), 8)?;

    let i8042 = Arc::new(Mutex::new(I8042::new(
        ExitTrigger::new(exit.clone(), ExitReason::Reset("i8042")),
        irq_line(vm, I8042_IRQ)?,
    )));
    pio.insert(i8042.clone(), u64::from(I8042_DATA_PORT), 5)?;
    let rtc = Arc::new(Mutex::new(Rtc::new()));
    pio.insert(rtc.clone(), u64::from(RTC_PORT), 2)?;
    pio.insert(Arc::new(Mutex::new(Sink)), 0x80, 1)?;
    let mut pm = AcpiPm::new(exit.clone());
    pm.set_sci(irq_line(vm, ACPI_SCI_IRQ)?);
    let acpi_pm = Arc::new(Mutex::new(pm));
    pio.insert(
        acpi_pm.clone(),
        u64::from(ACPI_PM_BASE),
        u64::from(ACPI_PM_SIZE),
    )?;
    let eject_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(MachineError::EventFd)?;
    let hotplug = Arc::new(Mutex::new(PciHotplug::new(
        acpi_pm.clone(),
        eject_evt.try_clone().map_err(MachineError::EventFd)?,
    )));
    pio.insert(
        hotplug.clone(),
        u64::from(PCI_HOTPLUG_PORT),
        u64::from(PCI_HOTPLUG_LEN),
    )?;
    pio.insert(
        Arc::new(Mutex::new(DebugExit::new(exit.clone()))),
        u64::from(DEBUG_EXIT_PORT),
        1,
    )?;

    let mut bus = PciBus::new();
    let (d, f) = chipset::HOST_BRIDGE_DEVFN;
    bus.add(d, f, Arc::new(Mutex::new(chipset::host_bridge())))?;
    let (d, f) = chipset::LPC_DEVFN;
    bus.add(d, f, Arc::new(Mutex::new(chipset::lpc_bridge())))?;
    let pci: SharedPciBus = Arc::new(Mutex::new(bus));

    let config_io = PciConfigIo::new(pci.clone(), ResetControl::new(exit.clone()));
    pio.insert(
        Arc::new(Mutex::new(config_io)),
        u64::from(PCI_CONFIG_ADDRESS_PORT),
        8,
    )?;
    mmio.insert(
        Arc::new(Mutex::new(Ecam::new(pci.clone()))),
        ECAM_START,
        ECAM_SIZE,
    )?;

    let (hb, lpc) = (chipset::HOST_BRIDGE_DEVFN, chipset::LPC_DEVFN);
    let ecam = DeviceInfo {
        id: "pcie-ecam".into(),
        kind: "pcie-ecam",
        pci_address: None,
        io_port: None,
        mmio_address: Some(format!("{ECAM_START:#x}")),
        state: "attached",
        backend: None,
        backend_pid: None,
        luns: None,
        scsi_luns: None,
    };
    let devices = vec![
        DeviceInfo::pci("host-bridge", "pci-host-bridge", hb.0, hb.1),
        DeviceInfo::pci("lpc", "isa-bridge", lpc.0, lpc.1),
        ecam,
        DeviceInfo::port("com1", "serial", COM1_PORT),
        DeviceInfo::port("i8042", "i8042", I8042_DATA_PORT),
        DeviceInfo::port("rtc", "cmos-rtc", RTC_PORT),
        DeviceInfo::port("acpi-pm", "acpi-pm", ACPI_PM_BASE),
        DeviceInfo::port("pci-config", "pci-config-io", PCI_CONFIG_ADDRESS_PORT),
        DeviceInfo::port("reset", "reset-control", RESET_CONTROL_PORT),
        DeviceInfo::port("debug-exit", "isa-debug-exit", DEBUG_EXIT_PORT),
        DeviceInfo::port("pci-hotplug", "acpi-pci-hotplug", PCI_HOTPLUG_PORT),
    ];
    Ok(Machine {
        pio: Arc::new(pio),
        mmio: Arc::new(mmio),
        serial,
        pci,
        i8042,
        rtc,
        acpi_pm,
        hotplug,
        eject_evt,
        devices,
    })
}
