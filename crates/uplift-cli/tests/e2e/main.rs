//! The end-to-end tests: real `uplift-server`, `uplift-agent` and `uplift`
//! processes in temp dirs on loopback, asserting what an operator would
//! see. One test binary, one module per area: 31 binaries took 85 s of
//! CI's two cores to compile and link (each with its own copy of
//! `common`), and each ran alone to its slowest test. Run one area with
//! `cargo test -p uplift-cli --test e2e faults::`.

mod browser;
mod common;

mod console_api;
mod delta_patches;
mod demo_command;
mod device_removal;
mod device_tags;
mod download_caps;
mod enrollment;
mod enrollment_approval;
mod events;
mod faults;
mod fleet_scale;
mod fleet_upgrade;
mod hooks;
mod load_generator;
mod loop_slots;
mod object_storage;
mod operator_roles;
mod phased_rollout_fleet;
mod phased_rollouts;
mod postgres_server;
mod private_address;
mod reboot_windows;
mod rejected_releases;
mod replicas;
mod rollback;
mod root_of_trust;
mod site_cache;
mod systemd_notify;
mod systemd_units;
mod web_console;
mod web_console_scale;
