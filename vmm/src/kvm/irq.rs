//! The VM's interrupt routing: KVM's default routes for the PIC and IOAPIC
//! pins, plus one MSI route per MSI-X vector in use. KVM_SET_GSI_ROUTING
//! replaces the whole table, so the table lives here and is written whole.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_irqchip, kvm_irq_routing_msi, KvmIrqRouting,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP,
    KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;

use crate::machine::layout::IOAPIC_PINS;

/// Errors changing routes.
#[derive(Debug, thiserror::Error)]
pub enum IrqError {
    /// KVM_SET_GSI_ROUTING failed.
    #[error("KVM_SET_GSI_ROUTING failed: {0}")]
    SetRouting(kvm_ioctls::Error),
    /// The routing table could not be built.
    #[error("cannot build the interrupt routing table")]
    Table,
    /// No GSI left.
    #[error("no free GSI for an MSI route")]
    Exhausted,
}

/// Largest GSI handed out for MSI routes (KVM allows 4096 routes on x86).
const MAX_GSI: u32 = 4095;

struct Table {
    msi: BTreeMap<u32, (u64, u32)>,
    free: Vec<u32>,
    next: u32,
}

/// The routing table of one VM.
pub struct GsiRouter {
    vm: Arc<VmFd>,
    table: Mutex<Table>,
}

fn irqchip(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip = kvm_irq_routing_irqchip { irqchip: chip, pin };
    e
}

fn msi(gsi: u32, address: u64, data: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e.u.msi = kvm_irq_routing_msi {
        address_lo: address as u32,
        address_hi: (address >> 32) as u32,
        data,
        ..Default::default()
    };
    e
}

/// The routes KVM sets up by itself with the in-kernel irqchip: ISA IRQs
/// 0-15 on the PICs and the IOAPIC, 16-23 on the IOAPIC only.
fn default_routes() -> Vec<kvm_irq_routing_entry> {
    let mut v = Vec::new();
    for i in 0..16 {
        let (chip, pin) = if i < 8 {
            (KVM_IRQCHIP_PIC_MASTER, i)
        } else {
            (KVM_IRQCHIP_PIC_SLAVE, i - 8)
        };
        v.push(irqchip(i, chip, pin));
    }
    for i in 0..IOAPIC_PINS {
        v.push(irqchip(i, KVM_IRQCHIP_IOAPIC, i));
    }
    v
}

impl GsiRouter {
    /// A router for `vm` (whose irqchip exists already).
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self {
            vm,
            table: Mutex::new(Table {
                msi: BTreeMap::new(),
                free: Vec::new(),
                next: IOAPIC_PINS,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A GSI for an MSI route (not routed until [`GsiRouter::set_msi`]).
    pub fn allocate(&self) -> Result<u32, IrqError> {
        let mut t = self.lock();
        if let Some(g) = t.free.pop() {
            return Ok(g);
        }
        if t.next > MAX_GSI {
            return Err(IrqError::Exhausted);
        }
        t.next += 1;
        Ok(t.next - 1)
    }

    /// Returns a GSI, dropping its route.
    pub fn release(&self, gsi: u32) -> Result<(), IrqError> {
        let mut t = self.lock();
        let had = t.msi.remove(&gsi).is_some();
        t.free.push(gsi);
        if had {
            self.apply(&t)?;
        }
        Ok(())
    }

    /// Routes `gsi` to the MSI message (address, data).
    pub fn set_msi(&self, gsi: u32, address: u64, data: u32) -> Result<(), IrqError> {
        let mut t = self.lock();
        if t.msi.get(&gsi) == Some(&(address, data)) {
            return Ok(());
        }
        t.msi.insert(gsi, (address, data));
        self.apply(&t)
    }

    /// Removes the route of `gsi` (a masked or disabled vector).
    pub fn clear_msi(&self, gsi: u32) -> Result<(), IrqError> {
        let mut t = self.lock();
        if t.msi.remove(&gsi).is_some() {
            self.apply(&t)?;
        }
        Ok(())
    }

    fn apply(&self, t: &Table) -> Result<(), IrqError> {
        let mut entries = default_routes();
        entries.extend(t.msi.iter().map(|(&gsi, &(a, d))| msi(gsi, a, d)));
        let routing = KvmIrqRouting::from_entries(&entries).map_err(|_| IrqError::Table)?;
        self.vm
            .set_gsi_routing(&routing)
            .map_err(IrqError::SetRouting)
    }
}
