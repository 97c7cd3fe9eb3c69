/* Linux x86 boot protocol: the fields of struct boot_params (the "zero page",
 * arch/x86/include/uapi/asm/bootparam.h) that the unikernel reads. */
#ifndef BOOTPARAM_H
#define BOOTPARAM_H

#define BP_SIZE 4096
#define BP_ACPI_RSDP_ADDR 0x070    /* u64 */
#define BP_EXT_CMD_LINE_PTR 0x0c8  /* u32, high half of the command line address */
#define BP_E820_ENTRIES 0x1e8      /* u8 */
#define BP_HDR_BOOT_FLAG 0x1fe     /* u16, 0xAA55 */
#define BP_HDR_HEADER 0x202        /* u32, "HdrS" */
#define BP_HDR_CMD_LINE_PTR 0x228  /* u32 */
#define BP_E820_TABLE 0x2d0        /* struct boot_e820_entry[128] */
#define BP_E820_MAX 128
#define BP_E820_ENTRY_SIZE 20      /* packed: u64 addr, u64 size, u32 type */

#define BP_BOOT_FLAG_MAGIC 0xaa55u
#define BP_HEADER_MAGIC 0x53726448u /* "HdrS" */

#endif
