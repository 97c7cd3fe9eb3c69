//! Emulated devices that tern serves itself: the legacy PC devices of the
//! q35 machine. (virtio devices are served by vhost-user backends.)

pub mod acpi_pm;
pub mod bus;
pub mod console_writer;
pub mod debug_exit;
pub mod i8042;
pub mod pci_hotplug;
pub mod reset_control;
pub mod rtc;
pub mod serial;
pub mod sink;
pub mod virtio;
