//! DSDT: the AML namespace of the q35 machine.
//!
//! ```text
//! \_S5_                 soft-off SLP_TYP values
//! \_SB.PCI0             PCIe host bridge (PNP0A08), its bus/IO/memory windows
//! \_SB.PCI0.LPC_        ICH9 LPC bridge 00:1f.0 with the ISA devices:
//!          .COM1          16550 UART (PNP0501)
//!          .PS2K          i8042 keyboard (PNP0303)
//!          .RTC_          CMOS RTC (PNP0B00)
//!          .Sxx_          one device per hot-pluggable slot (_ADR, _SUN, _EJ0)
//!          .PCNT          tells the OS which slots gained or are to lose a device
//! \_SB.MBRD             motherboard resources (PNP0C02): ECAM, PM I/O block,
//!                       PCI hot plug registers
//! \_SB.Cxxx             one processor device (ACPI0007) per vCPU
//! \_GPE._E01            GPE 1: PCI hot plug (calls PCNT)
//! ```
//!
//! PCI hot plug is ACPI's, as QEMU's q35 and Cloud Hypervisor do it: the
//! VMM sets a slot's bit in PCIU (device inserted) or PCID (removal asked)
//! and raises GPE 1; `_E01` notifies the slot's device (1: bus check, 3:
//! eject request), and the OS, done with the device, calls its `_EJ0`,
//! which writes the slot's bit to B0EJ (see `devices::pci_hotplug`).
//!
//! There is no power button device: the FADT declares the fixed-feature
//! power button (see `fadt`).

use acpi_tables::aml::{
    AddressSpace, AddressSpaceCacheable, And, Device, EISAName, Field, FieldAccessType, FieldEntry,
    FieldLockRule, FieldUpdateRule, If, Interrupt, Local, Memory32Fixed, Method, MethodCall, Name,
    Notify, OpRegion, OpRegionSpace, Package, Path, ResourceTemplate, Scope, ShiftLeft, Store, IO,
    ZERO,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::{Aml, AmlSink};

use super::{to_bytes, AcpiConfig, OEM_ID, OEM_REVISION, OEM_TABLE_ID};
use crate::machine::layout::{
    pci_intx_gsi, ACPI_PM_BASE, ACPI_PM_SIZE, ACPI_S5_SLP_TYP, COM1_IRQ, COM1_PORT, ECAM_LAST_BUS,
    ECAM_SIZE, ECAM_START, I8042_CMD_PORT, I8042_DATA_PORT, I8042_IRQ, MMIO32_END, MMIO32_START,
    PCI_CONFIG_ADDRESS_PORT, PCI_FIRST_DEVICE_SLOT, PCI_HOTPLUG_LEN, PCI_HOTPLUG_PORT,
    PCI_LAST_DEVICE_SLOT, RTC_IRQ, RTC_PORT,
};
use crate::machine::q35::chipset::LPC_DEVFN;

/// DSDT revision 2: AML integers are 64 bits wide, which the 64-bit PCI
/// window in `_CRS` needs (revision 1 would truncate them to 32 bits).
const DSDT_REVISION: u8 = 2;

/// A 16550 decodes eight consecutive ports.
const UART_PORTS: u8 = 8;
/// The CMOS RTC decodes its index and data ports.
const RTC_PORTS: u8 = 2;
/// Ports 0xCF8-0xCFF: CONFIG_ADDRESS, CONFIG_DATA and the ICH9 reset
/// control register in between. The host bridge consumes them itself, so
/// they are cut out of the I/O window it passes down to PCI devices.
const PCI_CONFIG_PORTS: u16 = 8;

// The memory windows and the ECAM reservation use 32-bit descriptors, and
// the PM block reservation an 8-bit length; the `as` casts below rely on it.
const _: () = assert!(MMIO32_END <= 1 << 32 && MMIO32_START < MMIO32_END);
const _: () = assert!(ECAM_START + ECAM_SIZE <= 1 << 32);
const _: () = assert!(ACPI_PM_SIZE <= u8::MAX as u16);

/// Already-encoded AML, so that lists of objects built in a loop (one per
/// vCPU) can be children of a scope without keeping each object alive.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

/// An ISA interrupt as the legacy devices use it: edge triggered, active
/// high, exclusive (matching how the IOAPIC pins 1/4/8 are programmed with no
/// interrupt source override).
fn isa_irq(irq: u32) -> Interrupt {
    Interrupt::new(true, true, false, false, irq)
}

/// An I/O range at a fixed port.
fn fixed_io(port: u16, len: u8) -> IO {
    IO::new(port, port, 1, len)
}

/// A legacy device on the LPC bus: `_HID`, optional `_UID`, and a `_CRS`.
fn isa_device(name: &str, hid: &str, uid: Option<u8>, resources: Vec<&dyn Aml>) -> RawAml {
    let hid = Name::new("_HID".into(), &EISAName::new(hid));
    let uid = uid.map(|uid| Name::new("_UID".into(), &uid));
    let crs = Name::new("_CRS".into(), &ResourceTemplate::new(resources));
    let mut children: Vec<&dyn Aml> = vec![&hid];
    if let Some(uid) = &uid {
        children.push(uid);
    }
    children.push(&crs);
    RawAml(to_bytes(&Device::new(name.into(), children)))
}

/// The ICH9 LPC bridge with the ISA devices behind it.
fn lpc() -> RawAml {
    let com1_io = fixed_io(COM1_PORT, UART_PORTS);
    let com1_irq = isa_irq(COM1_IRQ);
    // _UID 1: firmware numbers COM ports from 1. Linux still calls it ttyS0,
    // because 8250_pnp reuses the line of the legacy port at the same base.
    let com1 = isa_device("COM1", "PNP0501", Some(1), vec![&com1_io, &com1_irq]);

    let kbd_data = fixed_io(I8042_DATA_PORT, 1);
    let kbd_cmd = fixed_io(I8042_CMD_PORT, 1);
    let kbd_irq = isa_irq(I8042_IRQ);
    // Linux's i8042 driver finds the controller through this PNP device;
    // without it (and with ACPI on) it gives up with "No PS/2 controller
    // found". There is no PNP0F13 mouse: the driver then leaves AUX off.
    let kbd = isa_device("PS2K", "PNP0303", None, vec![&kbd_data, &kbd_cmd, &kbd_irq]);

    let rtc_io = fixed_io(RTC_PORT, RTC_PORTS);
    let rtc_irq = isa_irq(RTC_IRQ);
    let rtc = isa_device("RTC_", "PNP0B00", None, vec![&rtc_io, &rtc_irq]);

    let (dev, func) = LPC_DEVFN;
    let adr = Name::new("_ADR".into(), &((u32::from(dev) << 16) | u32::from(func)));
    RawAml(to_bytes(&Device::new(
        "LPC_".into(),
        vec![&adr, &com1, &kbd, &rtc],
    )))
}

/// The PCIe host bridge and what is below it.
fn pci0(cfg: &AcpiConfig) -> RawAml {
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0A08"));
    // PNP0A03 too, for code that only knows conventional PCI host bridges.
    let cid = Name::new("_CID".into(), &EISAName::new("PNP0A03"));
    let seg = Name::new("_SEG".into(), &0u8);
    let bbn = Name::new("_BBN".into(), &0u8);
    let uid = Name::new("_UID".into(), &0u8);

    // Windows the bridge decodes; Linux allocates BARs only inside them.
    // The address-space descriptors are producers (bridge windows); the
    // config ports are a plain I/O range the bridge itself decodes, which
    // Linux (x86 resource_is_pcicfg_ioport) removes from the windows.
    let buses = AddressSpace::<u16>::new_bus_number(0, ECAM_LAST_BUS.into());
    let config_ports = fixed_io(PCI_CONFIG_ADDRESS_PORT, PCI_CONFIG_PORTS as u8);
    let io_low = AddressSpace::<u16>::new_io(0, PCI_CONFIG_ADDRESS_PORT - 1, None);
    let io_high =
        AddressSpace::<u16>::new_io(PCI_CONFIG_ADDRESS_PORT + PCI_CONFIG_PORTS, u16::MAX, None);
    let mmio32 = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        MMIO32_START as u32,
        (MMIO32_END - 1) as u32,
        None,
    );
    // "Cacheable", not "prefetchable": Linux puts a non-prefetchable BAR in
    // a window only if the window is not marked prefetchable, and 64-bit
    // non-prefetchable BARs should be able to live up there too.
    let (mmio64_start, mmio64_end) = cfg.mmio64;
    let mmio64 = (mmio64_start < mmio64_end).then(|| {
        AddressSpace::<u64>::new_memory(
            AddressSpaceCacheable::Cacheable,
            true,
            mmio64_start,
            mmio64_end - 1,
            None,
        )
    });
    let mut resources: Vec<&dyn Aml> = vec![&buses, &config_ports, &io_low, &io_high, &mmio32];
    if let Some(mmio64) = &mmio64 {
        resources.push(mmio64);
    }
    let crs = Name::new("_CRS".into(), &ResourceTemplate::new(resources));

    let lpc = lpc();
    let prt = prt();
    let hotplug = hotplug_objects();

    let mut children: Vec<&dyn Aml> = vec![&hid, &cid, &seg, &bbn, &uid, &crs, &prt, &lpc];
    children.extend(hotplug.iter().map(|o| o as &dyn Aml));
    RawAml(to_bytes(&Device::new("PCI0".into(), children)))
}

/// The ACPI name of a slot's device.
fn slot_name(slot: u8) -> String {
    format!("S{slot:02X}_")
}

/// Under PCI0: the hot plug registers, a device per slot with `_EJ0`, the
/// eject helper PCEJ and the notifier PCNT.
fn hotplug_objects() -> Vec<RawAml> {
    let mut out = Vec::new();
    let port = u32::from(PCI_HOTPLUG_PORT);
    let len = u32::from(PCI_HOTPLUG_LEN);
    out.push(RawAml(to_bytes(&OpRegion::new(
        "PCST".into(),
        OpRegionSpace::SystemIO,
        &port,
        &len,
    ))));
    out.push(RawAml(to_bytes(&Field::new(
        "PCST".into(),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![
            FieldEntry::Named(*b"PCIU", 32),
            FieldEntry::Named(*b"PCID", 32),
            FieldEntry::Named(*b"B0EJ", 32),
            FieldEntry::Named(*b"SLOT", 32),
        ],
    ))));
    // PCEJ(slot): B0EJ = 1 << slot.
    let bit = ShiftLeft::new(&Local(0), &1u8, &acpi_tables::aml::Arg(0));
    let b0ej = Path::new("B0EJ");
    let eject = Store::new(&b0ej, &Local(0));
    out.push(RawAml(to_bytes(&Method::new(
        "PCEJ".into(),
        1,
        true,
        vec![&bit, &eject],
    ))));
    for slot in PCI_FIRST_DEVICE_SLOT..=PCI_LAST_DEVICE_SLOT {
        let adr = Name::new("_ADR".into(), &(u32::from(slot) << 16));
        let sun = Name::new("_SUN".into(), &u32::from(slot));
        let slot_arg = u32::from(slot);
        let call = MethodCall::new("PCEJ".into(), vec![&slot_arg]);
        let ej0 = Method::new("_EJ0".into(), 1, false, vec![&call]);
        out.push(RawAml(to_bytes(&Device::new(
            Path::new(&slot_name(slot)),
            vec![&adr, &sun, &ej0],
        ))));
    }
    // PCNT: Local0 = PCIU, Local1 = PCID; for each slot bit, Notify.
    let (pciu, pcid) = (Path::new("PCIU"), Path::new("PCID"));
    let up = Store::new(&Local(0), &pciu);
    let down = Store::new(&Local(1), &pcid);
    struct SlotNotify {
        slot: u8,
    }
    impl Aml for SlotNotify {
        fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
            let mask = 1u32 << self.slot;
            let dev = Path::new(&slot_name(self.slot));
            let inserted = And::new(&ZERO, &Local(0), &mask);
            let check = Notify::new(&dev, &1u8);
            If::new(&inserted, vec![&check]).to_aml_bytes(sink);
            let removing = And::new(&ZERO, &Local(1), &mask);
            let eject = Notify::new(&dev, &3u8);
            If::new(&removing, vec![&eject]).to_aml_bytes(sink);
        }
    }
    let notifies: Vec<SlotNotify> = (PCI_FIRST_DEVICE_SLOT..=PCI_LAST_DEVICE_SLOT)
        .map(|slot| SlotNotify { slot })
        .collect();
    let mut body: Vec<&dyn Aml> = vec![&up, &down];
    body.extend(notifies.iter().map(|n| n as &dyn Aml));
    out.push(RawAml(to_bytes(&Method::new("PCNT".into(), 0, true, body))));
    out
}

/// `\_GPE`: GPE 1's handler runs the hot plug notifier.
fn gpe_scope() -> RawAml {
    let call = MethodCall::new("\\_SB_.PCI0.PCNT".into(), vec![]);
    let e01 = Method::new("_E01".into(), 0, false, vec![&call]);
    RawAml(to_bytes(&Scope::new("\\_GPE".into(), vec![&e01])))
}

/// `_PRT`: INTA-INTD of every device slot to IOAPIC GSIs
/// (`layout::pci_intx_gsi`), for drivers that use INTx rather than MSI-X.
fn prt() -> RawAml {
    struct Entry {
        adr: u32,
        pin: u8,
        gsi: u32,
    }
    impl Aml for Entry {
        fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
            // Package { slot address, pin, source (0: a GSI), GSI }
            Package::new(vec![&self.adr, &self.pin, &0u8, &self.gsi]).to_aml_bytes(sink);
        }
    }
    let entries: Vec<Entry> = (PCI_FIRST_DEVICE_SLOT..=PCI_LAST_DEVICE_SLOT)
        .flat_map(|slot| {
            (0..4u8).map(move |pin| Entry {
                adr: (u32::from(slot) << 16) | 0xffff,
                pin,
                gsi: pci_intx_gsi(slot, pin),
            })
        })
        .collect();
    let refs: Vec<&dyn Aml> = entries.iter().map(|e| e as &dyn Aml).collect();
    RawAml(to_bytes(&Name::new("_PRT".into(), &Package::new(refs))))
}

/// Motherboard resources. Linux trusts the MCFG's ECAM window only if it is
/// "reserved as ACPI motherboard resource" by a PNP0C01/PNP0C02 `_CRS`; the
/// PM I/O block is reserved too, so that nothing gets a BAR on top of it.
fn motherboard_resources() -> RawAml {
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0C02"));
    let uid = Name::new("_UID".into(), &0u8);
    let ecam = Memory32Fixed::new(true, ECAM_START as u32, ECAM_SIZE as u32);
    let pm = fixed_io(ACPI_PM_BASE, ACPI_PM_SIZE as u8);
    let hotplug = fixed_io(PCI_HOTPLUG_PORT, PCI_HOTPLUG_LEN as u8);
    let crs = Name::new(
        "_CRS".into(),
        &ResourceTemplate::new(vec![&ecam, &pm, &hotplug]),
    );
    RawAml(to_bytes(&Device::new(
        "MBRD".into(),
        vec![&hid, &uid, &crs],
    )))
}

/// One processor device per vCPU, `_UID` = the MADT's processor UID (= APIC
/// id). Newer Linux warns about MADT processors without a namespace object,
/// and x2APIC processors must have one.
fn processors(num_cpus: u32) -> Vec<RawAml> {
    (0..num_cpus)
        .map(|id| {
            let hid = Name::new("_HID".into(), &"ACPI0007");
            let uid = Name::new("_UID".into(), &id);
            let name = format!("C{id:03X}");
            RawAml(to_bytes(&Device::new(Path::new(&name), vec![&hid, &uid])))
        })
        .collect()
}

/// Builds the DSDT for `cfg` (already validated).
pub(super) fn build(cfg: &AcpiConfig) -> Vec<u8> {
    // \_S5_: the SLP_TYP values for PM1a and PM1b control, then two reserved
    // entries. Linux writes SLP_TYP | SLP_EN to PM1a_CNT to power off.
    let s5 = Name::new(
        "_S5_".into(),
        &Package::new(vec![&ACPI_S5_SLP_TYP, &ACPI_S5_SLP_TYP, &0u8, &0u8]),
    );

    let pci0 = pci0(cfg);
    let mbrd = motherboard_resources();
    let cpus = processors(cfg.num_cpus);
    let mut sb_children: Vec<&dyn Aml> = vec![&pci0, &mbrd];
    sb_children.extend(cpus.iter().map(|cpu| cpu as &dyn Aml));
    let sb = Scope::new("\\_SB_".into(), sb_children);

    let mut dsdt = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    let mut aml = to_bytes(&s5);
    sb.to_aml_bytes(&mut aml);
    gpe_scope().to_aml_bytes(&mut aml);
    dsdt.append_slice(&aml);
    dsdt.as_slice().to_vec()
}
