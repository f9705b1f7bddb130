# Uplift A/B trial boot for U-Boot (hush shell; U-Boot 2018.01 or later).
# Build the script image U-Boot runs from the boot partition with:
#   mkimage -A arm -T script -C none -d boot.cmd boot.scr
# (-A arm64 on 64-bit boards; the architecture is only a label for scripts).
#
# This is the bootloader half of the trial-boot rules, the same decision as
# BootState::boot() in crates/uplift-bootenv/src/state.rs and as
# deploy/grub.cfg.snippet for GRUB:
#   - a slot on trial with attempts left: spend one attempt, saveenv, boot it;
#   - a slot on trial with no attempt left (0): end the trial, record it as
#     the slot that failed (uplift_fallback), saveenv, boot the committed slot;
#   - no trial: boot the committed slot and change nothing (no saveenv, so
#     normal boots never write the environment).
# The state is saved BEFORE booting, so a boot that crashes or hangs has
# already used its attempt. The agent (bootloader = "uboot" in agent.toml)
# commits a healthy trial slot and clears uplift_fallback once reported.
#
# Environment keys, the same as in the GRUB block (the agent writes them in
# the format fw_setenv writes; U-Boot writes them with saveenv):
#   uplift_default      committed slot, a or b
#   uplift_trial        slot on trial; absent when there is none
#   uplift_trial_tries  boot attempts the trial slot has left
#   uplift_fallback     trial slot that failed; absent once reported
# Uplift's own keys rather than U-Boot's bootcount/bootlimit/altbootcmd:
# bootcount lives in a register or in the environment depending on the
# board's build options, and counts every boot rather than only trial boots.
# These keys need nothing but saveenv (CONFIG_CMD_SAVEENV) and an
# environment on the same storage the agent writes (CONFIG_ENV_IS_IN_MMC,
# with CONFIG_SYS_REDUNDAND_ENVIRONMENT for power-cut safety).
#
# Attempts are counted down by comparing strings, 3 -> 2 -> 1 -> 0, so the
# script needs no setexpr. Keep trial_boot_attempts in agent.toml at 3 or
# less. Any other count (including a missing one) is treated as used up,
# which falls back to the committed slot: never an endless trial.
#
# Assumed layout (adapt to the board): mmc 0, partition 1 the boot partition
# holding this boot.scr; partition 2 slot a and partition 3 slot b, each a
# root file system with /boot/Image (or zImage) and /boot/<fdtfile>.
# Provision the environment once, from Linux: fw_setenv uplift_default a
# (with deploy/uboot/fw_env.config describing where the environment is).

# The committed slot. An environment never provisioned (no uplift_default)
# boots slot a and is not changed; the agent refuses to run until it is
# provisioned. uplift_boot and uplift_part are hush local variables
# (name=value, no setenv), so saveenv never stores them.
if test "${uplift_default}" = "b"; then
  uplift_boot=b
else
  uplift_boot=a
fi

if test -n "${uplift_trial}"; then
  if test "${uplift_trial_tries}" = "3"; then
    setenv uplift_trial_tries 2
  elif test "${uplift_trial_tries}" = "2"; then
    setenv uplift_trial_tries 1
  elif test "${uplift_trial_tries}" = "1"; then
    setenv uplift_trial_tries 0
  else
    # No attempt left: the trial slot failed. Boot the committed slot.
    setenv uplift_fallback "${uplift_trial}"
    setenv uplift_trial
    setenv uplift_trial_tries
  fi
  if test -n "${uplift_trial}"; then
    uplift_boot="${uplift_trial}"
  fi
  # One write of the whole environment; with the redundant layout it goes
  # to the inactive copy, so a power cut here keeps the previous state.
  saveenv
fi

# ---- end of the trial decision ----
# (crates/uplift-bootenv/tests/uboot_script.rs runs everything above this
# line in a real U-Boot and checks it makes BootState::boot()'s decision.)

# The agent learns which slot booted from uplift.slot= on the kernel command
# line. panic=10 makes a kernel that panics reboot after 10 s instead of
# hanging, so a new slot that cannot boot spends its tries and this script
# falls back; a hang is the hardware watchdog's job, and a user space that
# never commits is uplift-trial-guard.service's.
if test "${uplift_boot}" = "b"; then
  uplift_part=3
else
  uplift_part=2
fi
setenv bootargs "${bootargs} root=/dev/mmcblk0p${uplift_part} ro rootwait panic=10 uplift.slot=${uplift_boot}"
# A slot whose kernel cannot be loaded or started resets the board rather
# than stopping at the U-Boot prompt: its attempt is already spent, so the
# next boot tries it again with one fewer, and then falls back.
load mmc 0:${uplift_part} ${kernel_addr_r} /boot/Image || reset
load mmc 0:${uplift_part} ${fdt_addr_r} /boot/${fdtfile} || reset
booti ${kernel_addr_r} - ${fdt_addr_r}
reset
