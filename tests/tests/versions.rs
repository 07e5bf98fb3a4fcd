//! The releases of cloud-hypervisor a node may run (v39 to v53): what vmd
//! does differently for each, through the double playing the oldest and
//! newest releases side by side (`docs/cloud-hypervisor-versions.md`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use vmd::api::VmDisk;
use vmd::zbus::client::ClientError;
use vmd_runtime::vmm::{ApiError, Version, VersionCache, VmmApi};
use vmd_tests::guest;
use vmd_tests::stack::Stack;
use vmd_tests::vm::{ch_program_name, real_ch};
use vmd_tests::{bin, until};

/// A copy of the double that plays `release` (a copy, not a link: an
/// upgrade in place is a new file).
fn double_copy(dir: &Path, release: u16) -> PathBuf {
    let p = dir.join(format!("ch-double-v{release}"));
    std::fs::copy(bin("ch-double"), &p).unwrap();
    p
}

/// Points `link` at `target` atomically, as a node switching releases.
fn switch(link: &Path, target: &Path) {
    let tmp = link.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).unwrap();
    std::fs::rename(&tmp, link).unwrap();
}

fn method_err(e: ClientError) -> String {
    match e {
        ClientError::Method(m) => m,
        other => panic!("expected a method error, got {other}"),
    }
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A VMM without a VM (no `--kernel`): `program` with its API socket in `dir`.
async fn bare_vmm(dir: &Path, program: &Path) -> (Killed, VmmApi) {
    let socket = dir.join(format!(
        "api-{}.sock",
        program.file_name().unwrap().to_string_lossy()
    ));
    let child = Command::new(program)
        .arg("--api-socket")
        .arg(format!("path={}", socket.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let api = VmmApi::new(&socket);
    until(Duration::from_secs(10), "the API socket", || async {
        socket.exists()
    })
    .await;
    (Killed(child), api)
}

/// What `vm.info` without a VM answers on `release`: before v53 a 500,
/// since a 404; before v47 the innermost error alone, since the chain.
fn no_vm_reply(release: Version) -> (u16, Vec<&'static str>) {
    let status = if release.major >= 53 { 404 } else { 500 };
    let chain = if release.has_json_error_chain() {
        vec![
            "Error from API",
            "The VM info is not available",
            "VM is not created",
        ]
    } else {
        vec!["VM is not created"]
    };
    (status, chain)
}

/// v39 answers errors with one plain-text line, v53 with the JSON error
/// chain; `vm.info` without a VM is 500 on v39, 404 on v53. The client
/// reads both into the same error. With `VMD_TEST_CH`, the real binary is
/// checked against what its release should answer.
#[tokio::test]
async fn api_errors_of_the_oldest_and_newest_release_read_alike() {
    let dir = tempfile::tempdir().unwrap();
    let programs = if real_ch() {
        vec![vmd_tests::vm::ch_binary()]
    } else {
        vec![double_copy(dir.path(), 39), double_copy(dir.path(), 53)]
    };
    let second = Duration::from_secs(2);
    for program in programs {
        let release = VersionCache::new().supported(&program).await.unwrap();
        let (status, chain) = no_vm_reply(release);
        let (_vmm, api) = bare_vmm(dir.path(), &program).await;
        match api.info(second).await {
            Err(ApiError::Refused {
                status: s,
                chain: c,
            }) => {
                let c: Vec<&str> = c.iter().map(String::as_str).collect();
                assert_eq!((s, c), (status, chain.clone()), "{release}");
            }
            other => panic!("{release}: vm.info without a VM: {other:?}"),
        }
        // What a caller shows is the innermost cause either way.
        let e = api.info(second).await.unwrap_err().to_string();
        assert!(e.ends_with("VM is not created"), "{release}: {e}");
        assert_eq!(api.state(second).await, None);
        // An action the VM cannot take: 500 on both, the same two shapes.
        let e = api.put("vm.pause", second).await.unwrap_err();
        let want: Vec<&str> = if release.has_json_error_chain() {
            vec![
                "Error from API",
                "The VM could not be paused",
                "VM is not running",
            ]
        } else {
            vec!["VM is not running"]
        };
        match e {
            ApiError::Refused { status: 500, chain } => assert_eq!(chain, want, "{release}"),
            other => panic!("{release}: vm.pause without a VM: {other:?}"),
        }
        eprintln!("{release}: vm.info without a VM: {status} {chain:?}");
    }
}

/// `vm.info` as real v39 writes it (explicit `null`s, fewer fields; a
/// running VM of the shared guest, paths made neutral) reads like v53's.
#[test]
fn vm_info_of_real_v39_reads() {
    let info: vmd_runtime::vmm::VmInfo = serde_json::from_str(include_str!(
        "../fixtures/cloud-hypervisor/v39.0-vm.info.running.json"
    ))
    .unwrap();
    assert_eq!(info.state, vmd_runtime::vmm::VmState::Running);
}

/// A release outside v39..v53 is refused at Run, with the binary and the
/// range named; the node's binary upgraded in place (a link switched to
/// another release) is probed again and used at once, without restarting
/// vmd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsupported_release_is_refused_at_run_and_an_upgrade_is_seen() {
    if real_ch() {
        eprintln!("skipped: needs the double to play an unsupported release");
        return;
    }
    let bins = tempfile::tempdir().unwrap();
    let old = double_copy(bins.path(), 38);
    let v39 = double_copy(bins.path(), 39);
    let node_binary = bins.path().join("cloud-hypervisor");
    switch(&node_binary, &old);
    let flag = node_binary.to_string_lossy().into_owned();
    let env = Stack::start(&["--cloud-hypervisor", &flag]).await;
    let vm = env.vm("12-345-old", &[("gaction", "wait")]);
    let e = method_err(env.stub.run(&vm).await.unwrap_err());
    assert_eq!(
        e,
        format!(
            "cloud-hypervisor v38.0 at {} is not supported: vmd drives v39 to v53",
            node_binary.display()
        )
    );
    assert!(!env.stub.exists("12-345-old").await.unwrap());
    env.wait_gone("12-345-old").await;
    // The node upgrades: the same path is now v39.
    switch(&node_binary, &v39);
    env.stub.run(&vm).await.unwrap();
    let ring = env
        .zinit
        .client()
        .service_log(&"vm:12-345-old".parse().unwrap())
        .await
        .unwrap();
    assert!(
        ring.iter().any(|l| l.contains("(cloud-hypervisor v39.0)")),
        "{ring:?}"
    );
    env.stub.delete("12-345-old").await.unwrap();
    env.assert_nothing_left().await;
}

/// A guest can write sector 0 of its disks on every release: v51+ refuses
/// it on images whose type it only detected, so vmd declares the type it
/// detected at Run; v39 refuses the declaration, so vmd leaves it out.
/// With the double, both ends of the range side by side; with a real
/// cloud-hypervisor, its release, the real guest writing the sector from an
/// extra initramfs step (`vmd_tests::guest`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_write_sector_0_of_their_disks_on_every_release() {
    let bins = tempfile::tempdir().unwrap();
    // (what the messages call it, the `--cloud-hypervisor` flag if not the default)
    let programs: Vec<(String, Option<String>)> = if real_ch() {
        vec![(ch_program_name(), None)]
    } else {
        [39, 53]
            .into_iter()
            .map(|r| {
                let copy = double_copy(bins.path(), r);
                (format!("v{r}"), Some(copy.to_string_lossy().into_owned()))
            })
            .collect()
    };
    for (release, program) in programs {
        let flags = program
            .as_deref()
            .map_or(vec![], |p| vec!["--cloud-hypervisor", p]);
        let env = Stack::start(&flags).await;
        let name = "12-345-disk";
        let mut vm = env.vm(name, &[("gaction", "wait"), ("double.write_sector0", "1")]);
        if real_ch() {
            let base = PathBuf::from(&vm.initrd_image);
            let step =
                guest::initramfs_with_step(&base, env.sys.path(), "sector0", guest::WRITE_SECTOR0);
            vm.initrd_image = step.to_string_lossy().into_owned();
            vm.kernel_args.insert("rdinit".into(), "/sector0".into());
        }
        let disk = env.sys.path().join("data.img");
        std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
        vm.disks.push(VmDisk {
            path: disk.to_string_lossy().into_owned(),
            target: "/data".into(),
        });
        env.stub.run(&vm).await.unwrap();
        env.wait_logs(name, "GUEST-READY").await;
        let log = env.stub.logs_full(name).await.unwrap();
        assert!(
            log.contains("GUEST-SECTOR0 vda written"),
            "{release}:\n{log}"
        );
        assert!(!log.contains("I/O error"), "{release}:\n{log}");
        assert!(
            !log.contains("Disabling sector 0 writes"),
            "{release}:\n{log}"
        );
        env.stub.delete(name).await.unwrap();
        // What the guest wrote is in the image (the VMM has exited).
        let bytes = std::fs::read(&disk).unwrap();
        assert!(
            bytes[..512].iter().all(|b| *b == 0xa5),
            "{release}: sector 0 unchanged"
        );
        env.assert_nothing_left().await;
    }
}

/// Two VMMs writing one image corrupt it; v46+ refuses the second start
/// (image locks), v39 does not. vmd refuses it at Run on every release,
/// whatever path names the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writable_disk_belongs_to_one_vm_on_every_release() {
    let env = Stack::start(&[]).await;
    let disk = env.sys.path().join("shared.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let alias = env.sys.path().join("alias.img");
    std::os::unix::fs::symlink(&disk, &alias).unwrap();
    let with_disk = |name: &str, path: &Path| {
        let mut vm = env.vm(name, &[("gaction", "wait")]);
        vm.disks.push(VmDisk {
            path: path.to_string_lossy().into_owned(),
            target: "/data".into(),
        });
        vm
    };
    env.stub.run(&with_disk("12-345-a", &disk)).await.unwrap();
    let b = with_disk("12-345-b", &alias);
    let e = method_err(env.stub.run(&b).await.unwrap_err());
    assert_eq!(
        e,
        format!(
            "machine configuration validation failed: disk {} is already used by vm 12-345-a",
            alias.display()
        )
    );
    assert!(!env.run_dir("12-345-b").exists());
    env.stub.delete("12-345-a").await.unwrap();
    // The same file twice in one VM is refused too (whoever holds it).
    let mut twice = with_disk("12-345-c", &disk);
    twice.disks.push(VmDisk {
        path: alias.to_string_lossy().into_owned(),
        target: "/more".into(),
    });
    let e = method_err(env.stub.run(&twice).await.unwrap_err());
    assert_eq!(
        e,
        format!(
            "machine configuration validation failed: disk {} is the same file as {}",
            alias.display(),
            disk.display()
        )
    );
    env.stub.run(&b).await.unwrap();
    env.stub.delete("12-345-b").await.unwrap();
    env.assert_nothing_left().await;
}
