//! Install hooks: a failing pre- or post-install step aborts the install
//! before the boot choice changes, and the device keeps running its OS.

use crate::common;

use common::*;
use uplift_proto::channel::AgentState;
use uplift_proto::{ErrorKind, SlotName};

async fn install_with_hooks(hooks: &str, name: &str) -> (Fixture, uplift_fleet::Device, Vec<u8>) {
    let fx = Fixture::start();
    let mut spec = fx.spec(&format!("hw-{name}"));
    spec.extra_config = format!("\n[hooks]\n{hooks}\n");
    let device = fx.device(name, spec);
    fx.wait_enrolled(&device).await;
    let env = std::fs::read(device.bootenv_path()).unwrap();
    fx.release("1.1", DEVICE_TYPE, &fx.image_v1_1, &fx.key)
        .await;
    fx.rollout("1.1", None).await;
    (fx, device, env)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_pre_install_hook_aborts_before_anything_is_written() {
    let (fx, device, env) = install_with_hooks(
        r#"pre_install = ["sh", "-c", "echo \"battery at 4%, not installing $UPLIFT_VERSION\" >&2; exit 1"]"#,
        "pre",
    )
    .await;
    let view = fx
        .wait_device(&device, "the failure", |d| {
            d.state == Some(AgentState::Failed)
        })
        .await;
    let error = view.last_error.unwrap();
    assert_eq!(error.kind, ErrorKind::HookFailed);
    assert!(
        error.message.contains("pre-install hook") && error.message.contains("not installing 1.1"),
        "{error}"
    );
    assert_eq!(
        std::fs::metadata(device.slot_path(SlotName::B))
            .unwrap()
            .len(),
        0,
        "nothing written"
    );
    assert_eq!(
        std::fs::read(device.bootenv_path()).unwrap(),
        env,
        "boot choice unchanged"
    );
    assert!(
        !device.log().contains("retrying the install"),
        "a hook failure is not retried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_post_install_hook_leaves_the_verified_slot_unbootable() {
    let (fx, device, env) = install_with_hooks(
        r#"post_install = ["sh", "-c", "test -s \"$UPLIFT_SLOT_PATH\" && echo 'signature check of the kernel failed' >&2; exit 1"]"#,
        "post",
    )
    .await;
    let view = fx
        .wait_device(&device, "the failure", |d| {
            d.state == Some(AgentState::Failed)
        })
        .await;
    let error = view.last_error.unwrap();
    assert_eq!(error.kind, ErrorKind::HookFailed);
    assert!(
        error.message.contains("kernel failed"),
        "the hook ran after the slot was written: {error}"
    );
    assert_eq!(
        sha256_file(&device.slot_path(SlotName::B)),
        sha256_file(&fx.image_v1_1),
        "slot B was fully written"
    );
    assert_eq!(
        std::fs::read(device.bootenv_path()).unwrap(),
        env,
        "but never made bootable"
    );
    assert_eq!(view.running_version, Some(v("1.0")));
}
