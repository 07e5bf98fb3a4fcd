//! From a [`VmSpec`] to cloud-hypervisor's command line for one release.
//! Pure: same spec and version, same argv, so it is unit-tested field by
//! field, and golden-tested for the oldest and newest supported releases.

use std::path::Path;

use crate::layout::RunDir;
use crate::spec::VmSpec;
use crate::vmm::Version;

/// The fd the event monitor pipe is handed to the VMM on.
pub const EVENT_FD: i32 = 3;

/// The fd the first tap is handed to the VMM on; the next ones follow.
/// The shim opens the taps (`tap=NAME` would make the VMM open them itself,
/// which takes `CAP_NET_ADMIN`), so the VMM keeps no capability at all.
pub const FIRST_TAP_FD: i32 = 4;

/// The argv (without the program) for `spec` on cloud-hypervisor
/// `version`, with sockets in `run`.
pub fn hypervisor_args(spec: &VmSpec, run: &RunDir, version: Version) -> Vec<String> {
    let p = |p: &Path| p.display().to_string();
    let mut a: Vec<String> = Vec::new();
    // `--flag=` glues its value into one word.
    let mut push = |flag: &str, value: String| {
        if flag.ends_with('=') {
            a.push(format!("{flag}{value}"));
        } else {
            a.push(flag.to_owned());
            a.push(value);
        }
    };
    push(
        "--api-socket",
        format!("path={}", p(&spec.api_socket_in(run))),
    );
    push("--kernel", p(&spec.kernel));
    if let Some(i) = &spec.initramfs {
        push("--initramfs", p(i));
    }
    // One word: a command line starting with `-` stays the value, never
    // becomes a flag of the VMM's.
    push("--cmdline=", spec.cmdline.clone());
    push("--cpus", format!("boot={}", spec.vcpus));
    // virtio-fs needs guest memory the vhost-user daemon can map.
    let shared = if spec.shares.is_empty() {
        ""
    } else {
        ",shared=on"
    };
    push("--memory", format!("size={}M{shared}", spec.memory_mib));
    // The serial port on the VMM's stdout and stdin, which the shim holds
    // from before the VMM exists (a pipe out, a pty in): no byte is lost at
    // start or exit, and nothing else can ever connect. `socket=` loses
    // output written while no client is connected (v39), drops what is
    // queued at exit (v53), and a second client hangs v39 at power-off;
    // `file=` truncates on every reboot.
    push("--serial", "tty".into());
    // The virtio console would go to stdout: off, the serial is the console.
    push("--console", "off".into());
    push("--event-monitor", format!("fd={EVENT_FD}"));
    let mut multi = |flag: &str, values: Vec<String>| {
        if !values.is_empty() {
            a.push(flag.to_owned());
            a.extend(values);
        }
    };
    multi(
        "--disk",
        spec.disks
            .iter()
            .map(|d| {
                let ro = if d.readonly { ",readonly=on" } else { "" };
                // Declared, not detected: see `vmm::image`.
                let image_type = match d.format {
                    Some(f) if version.has_disk_image_type() => {
                        format!(",image_type={}", f.image_type())
                    }
                    _ => String::new(),
                };
                format!("path={}{ro}{image_type}", p(&d.path))
            })
            .collect(),
    );
    multi(
        "--net",
        spec.nets
            .iter()
            .zip(FIRST_TAP_FD..)
            .map(|(n, fd)| format!("fd={fd},mac={}", n.mac))
            .collect(),
    );
    multi(
        "--fs",
        spec.shares
            .iter()
            .map(|s| format!("tag={},socket={}", s.tag, p(&s.socket)))
            .collect(),
    );
    multi(
        "--device",
        spec.devices
            .iter()
            .map(|d| format!("path=/sys/bus/pci/devices/{d}"))
            .collect(),
    );
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::SpecError;
    use crate::spec::*;
    use crate::vmm::ImageFormat;

    fn base() -> VmSpec {
        VmSpec {
            version: SPEC_VERSION,
            name: "web".into(),
            hypervisor: "/usr/bin/cloud-hypervisor".into(),
            hypervisor_release: None,
            virtiofsd: "/usr/libexec/virtiofsd".into(),
            vcpus: 2,
            memory_mib: 512,
            kernel: "/k/vmlinux".into(),
            initramfs: None,
            cmdline: "console=ttyS0 root=/dev/vda rw".into(),
            disks: vec![],
            nets: vec![],
            shares: vec![],
            devices: vec![],
            keep_alive: true,
            grace_secs: 30,
            restart: RestartPolicy::default(),
            console: ConsoleSpec {
                log: "/logs/web".into(),
                rotate_bytes: 8 << 20,
                keep_bytes: 4 << 20,
            },
            web_console: None,
            api_socket: None,
            go_config: None,
            adopted: None,
            jail: None,
            tap_netns: None,
        }
    }

    const V39: Version = Version::new(39, 0);
    const V50: Version = Version::new(50, 2);
    const V53: Version = Version::new(53, 0);

    fn run() -> RunDir {
        RunDir::new("/run/vmd/web")
    }

    fn value_of<'a>(a: &'a [String], flag: &str) -> Vec<&'a str> {
        let Some(i) = a.iter().position(|x| x == flag) else {
            return vec![];
        };
        a[i + 1..]
            .iter()
            .take_while(|x| !x.starts_with("--"))
            .map(String::as_str)
            .collect()
    }

    #[test]
    fn minimal_vm_is_the_same_on_every_version() {
        for v in [V39, V50, V53] {
            assert_eq!(
                hypervisor_args(&base(), &run(), v),
                [
                    "--api-socket",
                    "path=/run/vmd/web/api.sock",
                    "--kernel",
                    "/k/vmlinux",
                    "--cmdline=console=ttyS0 root=/dev/vda rw",
                    "--cpus",
                    "boot=2",
                    "--memory",
                    "size=512M",
                    "--serial",
                    "tty",
                    "--console",
                    "off",
                    "--event-monitor",
                    "fd=3",
                ],
                "{v}"
            );
        }
    }

    /// A VM with every kind of device, as v39 (Zero-OS) and v53 get it.
    #[test]
    fn golden_command_lines_of_the_oldest_and_newest_release() {
        let mut s = base();
        s.initramfs = Some("/k/initrd".into());
        s.disks = vec![
            Disk {
                path: "/d/root".into(),
                readonly: false,
                format: Some(ImageFormat::Raw),
            },
            Disk {
                path: "/d/data.qcow2".into(),
                readonly: false,
                format: Some(ImageFormat::Qcow2),
            },
            Disk {
                path: "/d/seed.img".into(),
                readonly: true,
                format: Some(ImageFormat::Raw),
            },
        ];
        s.nets = vec![Net {
            tap: "t-abc".into(),
            mac: "de:ad:be:ef:00:01".into(),
        }];
        let common = |disks: &[&str]| {
            let mut a: Vec<String> = [
                "--api-socket",
                "path=/run/vmd/web/api.sock",
                "--kernel",
                "/k/vmlinux",
                "--initramfs",
                "/k/initrd",
                "--cmdline=console=ttyS0 root=/dev/vda rw",
                "--cpus",
                "boot=2",
                "--memory",
                "size=512M",
                "--serial",
                "tty",
                "--console",
                "off",
                "--event-monitor",
                "fd=3",
                "--disk",
            ]
            .map(String::from)
            .to_vec();
            a.extend(disks.iter().map(|d| d.to_string()));
            a.extend(["--net", "fd=4,mac=de:ad:be:ef:00:01"].map(String::from));
            a
        };
        // v39 refuses `image_type` ("unknown option"): formats are left to it.
        assert_eq!(
            hypervisor_args(&s, &run(), V39),
            common(&[
                "path=/d/root",
                "path=/d/data.qcow2",
                "path=/d/seed.img,readonly=on"
            ])
        );
        assert_eq!(
            hypervisor_args(&s, &run(), V50),
            hypervisor_args(&s, &run(), V39)
        );
        // v51+: declared, or sector-0 writes of raw disks are refused.
        assert_eq!(
            hypervisor_args(&s, &run(), V53),
            common(&[
                "path=/d/root,image_type=raw",
                "path=/d/data.qcow2,image_type=qcow2",
                "path=/d/seed.img,readonly=on,image_type=raw"
            ])
        );
    }

    #[test]
    fn a_disk_of_an_older_description_is_left_to_the_vmm() {
        let mut s = base();
        s.disks = vec![Disk {
            path: "/d/root".into(),
            readonly: false,
            format: None,
        }];
        assert_eq!(
            value_of(&hypervisor_args(&s, &run(), V53), "--disk"),
            ["path=/d/root"]
        );
    }

    #[test]
    fn initramfs() {
        let mut s = base();
        s.initramfs = Some("/k/initrd".into());
        assert_eq!(
            value_of(&hypervisor_args(&s, &run(), V53), "--initramfs"),
            ["/k/initrd"]
        );
    }

    #[test]
    fn cmdline_is_one_argument() {
        let mut s = base();
        s.cmdline = "--disk=path=/etc/shadow a=1 b=\"two words\" c".into();
        let argv = hypervisor_args(&s, &run(), V53);
        let words: Vec<&String> = argv.iter().filter(|a| a.contains("cmdline")).collect();
        assert_eq!(words, [&format!("--cmdline={}", s.cmdline)]);
    }

    #[test]
    fn disks_in_order_with_readonly_seed() {
        let mut s = base();
        s.disks = vec![
            Disk {
                path: "/d/root".into(),
                readonly: false,
                format: None,
            },
            Disk {
                path: "/d/data".into(),
                readonly: false,
                format: None,
            },
            Disk {
                path: "/d/seed.img".into(),
                readonly: true,
                format: None,
            },
        ];
        assert_eq!(
            value_of(&hypervisor_args(&s, &run(), V53), "--disk"),
            [
                "path=/d/root",
                "path=/d/data",
                "path=/d/seed.img,readonly=on"
            ]
        );
    }

    #[test]
    fn nets_with_tap_and_mac() {
        let mut s = base();
        s.nets = vec![
            Net {
                tap: "t-abc".into(),
                mac: "de:ad:be:ef:00:01".into(),
            },
            Net {
                tap: "p-abc".into(),
                mac: "de:ad:be:ef:00:02".into(),
            },
        ];
        assert_eq!(
            value_of(&hypervisor_args(&s, &run(), V53), "--net"),
            ["fd=4,mac=de:ad:be:ef:00:01", "fd=5,mac=de:ad:be:ef:00:02"]
        );
    }

    #[test]
    fn shares_need_shared_memory() {
        let mut s = base();
        s.shares = vec![Share {
            tag: "vroot".into(),
            socket: "/run/vmd/web/fs-vroot.sock".into(),
            source: "/mnt/root".into(),
        }];
        let a = hypervisor_args(&s, &run(), V53);
        assert_eq!(value_of(&a, "--memory"), ["size=512M,shared=on"]);
        assert_eq!(
            value_of(&a, "--fs"),
            ["tag=vroot,socket=/run/vmd/web/fs-vroot.sock"]
        );
    }

    #[test]
    fn pci_devices() {
        let mut s = base();
        s.devices = vec!["0000:01:00.0".into()];
        assert_eq!(
            value_of(&hypervisor_args(&s, &run(), V53), "--device"),
            ["path=/sys/bus/pci/devices/0000:01:00.0"]
        );
    }

    #[test]
    fn unrepresentable_values_are_refused() {
        let mut s = base();
        s.disks = vec![Disk {
            path: "/d/a,b".into(),
            readonly: false,
            format: None,
        }];
        assert!(s.validate().is_err());
        let mut s = base();
        s.kernel = "relative/vmlinux".into();
        assert!(s.validate().is_err());
        let mut s = base();
        s.nets = vec![Net {
            tap: "t-a".into(),
            mac: "aa,bb".into(),
        }];
        assert!(s.validate().is_err());
        let mut s = base();
        s.cmdline = "a\nb".into();
        assert!(s.validate().is_err());
        let mut s = base();
        s.devices = vec!["../../x".into()];
        assert!(s.validate().is_err());
        let mut s = base();
        s.version = 2;
        assert!(matches!(s.validate(), Err(SpecError::Version(2))));
        assert!(base().validate().is_ok());
    }
}
