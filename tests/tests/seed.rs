//! The cloud-init seed image read back by an independent tool (mtools).

use std::process::Command;

use vmd::api::Vm;
use vmd::vm::cloudinit::{seed_files, write_image};

fn full_vm() -> Vm {
    let bytes = vmd_tests::vectors().remove("arg_vm_full").expect("vector");
    let mut vm: Vm = vmd::zbus::codec::decode(&bytes).unwrap();
    vm.entrypoint = "/sbin/zinit init --name \"my web\" '$(id)'".into();
    vm.environment
        .insert("QUOTED".into(), "it's \"x\"\nline2".into());
    vm
}

fn mtools(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{} (install mtools): {e}", args[0]));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

const META: &str = "instance-id: 7-42-web\nlocal-hostname: web\n";

const NETWORK: &str = "version: 2
ethernets:
  eth0:
    match:
      macaddress: de:ad:be:ef:00:01
    set-name: eth0
    addresses:
    - 10.20.2.5/24
    - fd00:1:2:3::5/64
    routes:
    - to: 10.20.0.0/16
      via: 10.20.2.1
    - to: 100.64.0.0/16
      via: 10.20.2.1
    nameservers:
      addresses:
      - 8.8.8.8
      - 1.1.1.1
      - 2001:4860:4860::8888
  eth1:
    match:
      macaddress: de:ad:be:ef:00:02
    set-name: eth1
    addresses:
    - 185.69.166.7/24
    - 2a02:1802:5e::7/64
    gateway4: 185.69.166.1
    gateway6: 2a02:1802:5e::1
";

const USER: &str = "#cloud-config
users:
- name: root
  ssh_authorized_keys:
  - ssh-ed25519 AAAA
mounts:
- - /dev/vdb
  - /data
  - auto
  - defaults
- - /dev/vdc
  - /var/lib
  - auto
  - defaults
- - 7-42-qsfs
  - /qsfs
  - virtiofs
  - defaults
";

const ZOSRC: &str = "export QUOTED='it'\\''s \"x\"
line2'
export SSH_KEY='ssh-ed25519 AAAA'
export ZOS='1'
init='/sbin/zinit'
set -- 'init' '--name' 'my web' '$(id)'
";

#[test]
fn the_full_example_vm_reads_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("seed.img");
    write_image(&img, &seed_files(&full_vm()).unwrap())
        .unwrap()
        .sync()
        .unwrap();
    let i = img.to_str().unwrap();
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 2 << 20);
    assert!(mtools(&["mlabel", "-i", i, "-s", "::"]).contains("Volume label is cidata"));
    let listing = mtools(&["mdir", "-i", i, "-b", "::"]);
    let mut names: Vec<&str> = listing
        .lines()
        .map(|l| l.trim_start_matches("::/"))
        .collect();
    names.sort();
    assert_eq!(names, ["meta-data", "network-config", "user-data", "zosrc"]);
    for (name, want) in [
        ("meta-data", META),
        ("network-config", NETWORK),
        ("user-data", USER),
        ("zosrc", ZOSRC),
    ] {
        let got = mtools(&["mtype", "-i", i, &format!("::{name}")]);
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn zosrc_is_safe_for_a_shell() {
    // Sourced by sh, every value comes back as it was, nothing runs.
    let files = seed_files(&full_vm()).unwrap();
    let script = format!(
        "{}\nprintf '%s|' \"$QUOTED\" \"$init\" \"$@\"",
        files["zosrc"]
    );
    let out = Command::new("sh").args(["-c", &script]).output().unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "it's \"x\"\nline2|/sbin/zinit|init|--name|my web|$(id)|"
    );
}

#[test]
fn malformed_values_are_refused() {
    let mut vm = full_vm();
    vm.entrypoint = "/bin/sh 'unbalanced".into();
    assert!(seed_files(&vm)
        .unwrap_err()
        .to_string()
        .contains("unbalanced quotes"));
    let mut vm = full_vm();
    vm.network.ifaces[0].ips[0].mask.0 = serde_bytes::ByteBuf::from(vec![255, 0, 255, 0]);
    assert!(seed_files(&vm)
        .unwrap_err()
        .to_string()
        .contains("not a valid prefix"));
}
