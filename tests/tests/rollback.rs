//! A roll-back to the Go VM module: vmd keeps, for every VM, the config
//! file the Go module reads and a VMM its `/proc` rule finds under the VM's
//! name, so that the Go module adopts vmd's VMs instead of killing them;
//! what it then does to them (Inspect on the API socket, Delete) works.

use std::time::Duration;

use serde_json::Value;
use vmd_runtime::state::{Phase, ShimState};
use vmd_tests::gomodule::GoView;
use vmd_tests::stack::Stack;
use vmd_tests::until;

fn view(env: &Stack) -> GoView {
    GoView::read(
        &env.vmd.runtime().join("go-config"),
        &env.vmd.runtime().join("api"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_roll_back_the_go_module_adopts_every_vm_and_can_delete_them() {
    let mut env = Stack::start(&["--grace-secs", "5"]).await;
    let names = ["7-1-a", "7-2-b", "plain"];
    for n in names {
        env.stub.run(&env.vm(n, &[])).await.unwrap();
    }
    let mut gone = env.vm("gone", &[]);
    gone.no_keep_alive = true;
    env.stub.run(&gone).await.unwrap();
    env.stub.delete("gone").await.unwrap();

    // Each config is what the Go module reads (machine.go's keys).
    for n in names {
        let text = std::fs::read_to_string(env.go_config(n)).unwrap();
        assert_eq!(text.lines().count(), 1, "one line of JSON: {text}");
        let m: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(m["id"], n);
        assert_eq!(m["boot-source"]["kernel_image_path"], env.kernel());
        assert_eq!(m["machine-config"]["vcpu_count"], 1);
        assert_eq!(m["machine-config"]["mem_size_mib"], 256);
        assert_eq!(m["machine-config"]["ht_enabled"], false);
        assert_eq!(m["no-keep-alive"], false);
        // The cloud-init image last and read-only, as the Go module has it.
        let drives = m["drives"].as_array().unwrap();
        let last = drives.last().unwrap();
        assert_eq!(last["is_read_only"], true);
        assert_eq!(last["drive_id"], drives.len().to_string());
        assert!(m["network-interfaces"].as_array().unwrap().is_empty());
    }
    assert!(
        !env.go_config("gone").exists(),
        "a deleted VM's config stays"
    );

    // vmd stops (the roll-back): the Go module would adopt every VM.
    env.vmd.crash();
    let v = view(&env);
    assert_eq!(v.would_kill(), Vec::<String>::new(), "{v:?}");
    assert_eq!(v.adopted(), names.map(String::from).to_vec(), "{v:?}");

    // Its Inspect: GET vm.info on /var/run/cloud-hypervisor/<name>.
    let info = vmd_runtime::vmm::api::expect_ok(
        &env.api_socket("7-1-a"),
        "GET",
        "vm.info",
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let info: Value = serde_json::from_slice(&info).unwrap();
    assert_eq!(info["state"], "Running");

    // Its Delete: the config removed, the VMM stopped (its SIGTERM, SIGKILL
    // after 10 s). vmd's shim does not start it again.
    std::fs::remove_file(env.go_config("7-2-b")).unwrap();
    let pid = v.running["7-2-b"];
    // SAFETY: kill has no memory effects.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    until(
        Duration::from_secs(10),
        "the shim stopped, not restarting",
        || async {
            let st = ShimState::load(&env.run_dir("7-2-b").join("state.json"))
                .ok()
                .flatten();
            st.is_some_and(|s| s.phase == Phase::Stopped)
        },
    )
    .await;
    let st = ShimState::load(&env.run_dir("7-2-b").join("state.json"))
        .unwrap()
        .unwrap();
    assert!(
        st.reason
            .as_deref()
            .unwrap_or_default()
            .contains("deleted by the Go VM module"),
        "{st:?}"
    );
    let v = view(&env);
    assert!(!v.running.contains_key("7-2-b"), "{v:?}");
    assert_eq!(v.would_kill(), Vec::<String>::new());

    // Back to vmd: it deletes what is left cleanly.
    env.vmd.restart();
    env.vmd.wait_ready().await;
    for n in names {
        env.stub.delete(n).await.unwrap();
    }
    env.assert_nothing_left().await;
}
