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
    let mut pio = Bus::new();
    let mut mmio = Bus::new();

    let serial = Arc::new(Mutex::new(SerialDevice::new(
        irq_line(vm, COM1_IRQ)?,
        serial_out,
    )));
    pio.insert(serial.clone(), u64::from(COM1_PORT), 8)?;

    let i8042 = I8042::new(ExitTrigger::new(exit.clone(), ExitReason::Reset("i8042")));
    pio.insert(Arc::new(Mutex::new(i8042)), u64::from(I8042_DATA_PORT), 5)?;
    pio.insert(Arc::new(Mutex::new(Rtc::new())), u64::from(RTC_PORT), 2)?;
    pio.insert(Arc::new(Mutex::new(Sink)), 0x80, 1)?;
    pio.insert(
        Arc::new(Mutex::new(AcpiPm::new(exit.clone()))),
        u64::from(ACPI_PM_BASE),
        u64::from(ACPI_PM_SIZE),
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

    Ok(Machine {
        pio: Arc::new(pio),
        mmio: Arc::new(mmio),
        serial,
        pci,
    })
}
