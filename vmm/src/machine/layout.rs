//! The guest physical address map and I/O port map of tern's q35 machine.
//!
//! Everything that places something in the guest's address space takes its
//! address from here, so that the ACPI tables, the E820 map, the boot code and
//! the device buses always agree.

/// Start of guest RAM.
pub const RAM_START: u64 = 0;

/// The legacy hole (EBDA, VGA, option ROMs, BIOS) below 1 MiB. The E820 map
/// reports RAM below it and reserved from it to 1 MiB.
pub const LEGACY_HOLE_START: u64 = 0x9_fc00;
/// End of the legacy hole.
pub const LEGACY_HOLE_END: u64 = 0x10_0000;

/// GDT used for the 64-bit Linux entry.
pub const BOOT_GDT_START: u64 = 0x500;
/// IDT used for the 64-bit Linux entry (an empty one).
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// Linux `boot_params` (zero page) for the 64-bit entry.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// PVH memory map (`hvm_memmap_table_entry` array), after the start info.
pub const PVH_MEMMAP_START: u64 = 0x6040;
/// Maximum number of entries in the PVH memory map.
pub const PVH_MEMMAP_MAX_ENTRIES: usize = 64;
/// Identity page tables for the 64-bit Linux entry: PML4, PDPTE, then PDEs.
pub const PML4_START: u64 = 0x9000;
/// First page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// First page directory (four of them map the low 4 GiB with 2 MiB pages).
pub const PDE_START: u64 = 0xb000;
/// Initial stack pointer for the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Largest command line accepted (Linux's COMMAND_LINE_SIZE on x86 is 2048;
/// PVH kernels take more, so allow a page).
pub const CMDLINE_MAX_SIZE: usize = 4096;

/// ACPI tables live in the BIOS area so that a guest scanning 0xE0000-0xFFFFF
/// for the RSDP finds it even without a boot protocol pointer.
pub const ACPI_START: u64 = 0xe_0000;
/// End (exclusive) of the area reserved for ACPI tables.
pub const ACPI_END: u64 = 0x10_0000;

/// Where kernels are loaded (the 1 MiB mark).
pub const HIMEM_START: u64 = 0x10_0000;

/// PCIe ECAM (MMCONFIG) window: 256 buses x 32 devices x 8 functions x 4 KiB.
pub const ECAM_START: u64 = 0xb000_0000;
/// Size of the ECAM window.
pub const ECAM_SIZE: u64 = 0x1000_0000;
/// Last PCI bus number described by ECAM.
pub const ECAM_LAST_BUS: u8 = 0xff;

/// Low RAM ends where ECAM begins; the rest of RAM goes above 4 GiB.
pub const LOW_RAM_END: u64 = ECAM_START;

/// 32-bit PCI MMIO window (for BARs), from the end of ECAM to the IOAPIC.
pub const MMIO32_START: u64 = ECAM_START + ECAM_SIZE;
/// End (exclusive) of the 32-bit PCI MMIO window.
pub const MMIO32_END: u64 = 0xfec0_0000;

/// IOAPIC MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC MMIO base.
pub const LAPIC_START: u64 = 0xfee0_0000;

/// First address above 4 GiB: RAM that does not fit below the hole.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;

/// Size of the 64-bit PCI MMIO window placed after the end of RAM (aligned to
/// 1 GiB).
pub const MMIO64_SIZE: u64 = 64 << 30;

/// 16550 UART (COM1) I/O base and its ISA IRQ.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1 IRQ.
pub const COM1_IRQ: u32 = 4;
/// i8042 data port (the command/status port is 0x64).
pub const I8042_DATA_PORT: u16 = 0x60;
/// i8042 command/status port.
pub const I8042_CMD_PORT: u16 = 0x64;
/// i8042 keyboard IRQ.
pub const I8042_IRQ: u32 = 1;
/// CMOS RTC index/data ports.
pub const RTC_PORT: u16 = 0x70;
/// RTC IRQ.
pub const RTC_IRQ: u32 = 8;
/// PCI configuration address/data ports (type 1 access).
pub const PCI_CONFIG_ADDRESS_PORT: u16 = 0xcf8;
/// PCI configuration data port.
pub const PCI_CONFIG_DATA_PORT: u16 = 0xcfc;
/// ICH9 reset control register.
pub const RESET_CONTROL_PORT: u16 = 0xcf9;
/// Value the FADT's RESET_REG tells the guest to write to the reset port.
pub const RESET_VALUE: u8 = 0x06;
/// isa-debug-exit port (QEMU's convention): writing V exits with (V << 1) | 1.
pub const DEBUG_EXIT_PORT: u16 = 0x501;

/// ACPI PM register block (ICH9 places it at PMBASE; 0x600 as QEMU's q35).
pub const ACPI_PM_BASE: u16 = 0x600;
/// PM1a event block (status + enable, 2 bytes each).
pub const ACPI_PM1A_EVT: u16 = ACPI_PM_BASE;
/// PM1a event block length.
pub const ACPI_PM1_EVT_LEN: u8 = 4;
/// PM1a control block.
pub const ACPI_PM1A_CNT: u16 = ACPI_PM_BASE + 4;
/// PM1a control block length.
pub const ACPI_PM1_CNT_LEN: u8 = 2;
/// ACPI PM timer (24-bit, 3.579545 MHz).
pub const ACPI_PM_TMR: u16 = ACPI_PM_BASE + 8;
/// PM timer block length.
pub const ACPI_PM_TMR_LEN: u8 = 4;
/// GPE0 block (status + enable).
pub const ACPI_GPE0_BLK: u16 = ACPI_PM_BASE + 0x20;
/// GPE0 block length.
pub const ACPI_GPE0_BLK_LEN: u8 = 16;
/// Size of the whole PM I/O block.
pub const ACPI_PM_SIZE: u16 = 0x80;
/// SCI interrupt (ISA IRQ 9, level triggered, active high as on ICH9).
pub const ACPI_SCI_IRQ: u32 = 9;
/// The PCI hot plug register block (ACPI PCI hot plug, see
/// `devices::pci_hotplug`): PCIU, PCID, B0EJ and SLOT, 32 bits each.
pub const PCI_HOTPLUG_PORT: u16 = 0xae00;
/// Its length.
pub const PCI_HOTPLUG_LEN: u16 = 0x10;
/// The GPE0 bit whose `_E01` method tells the OS about hot plug events.
pub const PCI_HOTPLUG_GPE: u8 = 1;
/// SLP_TYP value the DSDT's `\_S5` package gives for soft-off.
pub const ACPI_S5_SLP_TYP: u8 = 5;

/// Number of IOAPIC pins (KVM's in-kernel IOAPIC has 24).
pub const IOAPIC_PINS: u32 = 24;

/// First IOAPIC pin for PCI INTx (pins 16-23, as on q35).
pub const PCI_INTX_GSI_BASE: u32 = 16;
/// Number of IOAPIC pins PCI INTx is spread over.
pub const PCI_INTX_GSIS: u32 = 8;

/// The GSI of INTx `pin` (0 = INTA) of the device in `slot` on bus 0: the
/// usual rotation, so that neighbouring slots do not share a line. The
/// DSDT's `_PRT` says the same.
pub fn pci_intx_gsi(slot: u8, pin: u8) -> u32 {
    PCI_INTX_GSI_BASE + (u32::from(slot) + u32::from(pin)) % PCI_INTX_GSIS
}

/// First PCI slot for devices (0 is the host bridge).
pub const PCI_FIRST_DEVICE_SLOT: u8 = 1;
/// Last PCI slot for devices (31 is the LPC bridge).
pub const PCI_LAST_DEVICE_SLOT: u8 = 30;
