//! The unit files shipped in `zinit/etc/` are valid service files.

use zinit::{Log, Service};

#[test]
fn vmd_unit_is_what_zero_os_runs() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/etc/vmd.yaml")).unwrap();
    let svc = Service::from_yaml(&text).unwrap();
    assert_eq!(
        svc.exec.argv(),
        ["vmd", "--broker", "unix:///var/run/redis.sock"]
    );
    assert_eq!(
        svc.test.unwrap().argv(),
        ["vmd", "ctl", "--timeout", "3", "status"]
    );
    let after: Vec<&str> = svc.after.iter().map(|a| a.as_str()).collect();
    assert_eq!(after, ["boot", "networkd", "flistd"]);
    assert_eq!(svc.log, Log::Ring);
    assert!(!svc.oneshot);
}
