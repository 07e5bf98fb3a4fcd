//! The restart policy: what happens after the VMM exits. Pure, so every
//! rule is a unit test; the exits it counts are kept in `state.json`.

use std::time::Duration;

use vmd_runtime::spec::RestartPolicy;
use vmd_runtime::state::Exit;

/// What to do after the VMM exited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Restart {
        after: Duration,
    },
    /// The guest powered off and the VM is not kept alive.
    StayOff,
    GiveUp {
        reason: String,
    },
}

/// Records `exit` in `exits` (dropping those outside the window) and decides.
pub fn decide(
    policy: &RestartPolicy,
    keep_alive: bool,
    exits: &mut Vec<Exit>,
    exit: Exit,
) -> Decision {
    let horizon = exit.at.saturating_sub(policy.window_secs);
    exits.retain(|e| e.at > horizon);
    exits.push(exit.clone());
    if exit.clean && !keep_alive {
        return Decision::StayOff;
    }
    let n = exits.len() as u32;
    if n >= policy.max_exits {
        return Decision::GiveUp {
            reason: format!(
                "the VM stopped {n} times within {} s (last: {}); not restarting it",
                policy.window_secs, exit.status
            ),
        };
    }
    // A lone clean power-off restarts at once; repeated exits back off
    // 1 s, 2 s, 4 s … up to the cap.
    if exit.clean && n == 1 {
        return Decision::Restart {
            after: Duration::ZERO,
        };
    }
    let secs = 1u64
        .checked_shl(n.saturating_sub(1))
        .unwrap_or(u64::MAX)
        .min(policy.max_backoff_secs);
    Decision::Restart {
        after: Duration::from_secs(secs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit(at: u64, clean: bool) -> Exit {
        Exit {
            at,
            status: if clean {
                "exit 0".into()
            } else {
                "exit 1".into()
            },
            clean,
        }
    }

    #[test]
    fn crashes_back_off_then_give_up() {
        let p = RestartPolicy::default();
        let mut exits = Vec::new();
        let mut delays = Vec::new();
        for i in 0..4 {
            match decide(&p, true, &mut exits, exit(1000 + i, false)) {
                Decision::Restart { after } => delays.push(after.as_secs()),
                d => panic!("{d:?}"),
            }
        }
        assert_eq!(delays, [1, 2, 4, 8]);
        let d = decide(&p, true, &mut exits, exit(1010, false));
        assert!(
            matches!(d, Decision::GiveUp { ref reason } if reason.contains("5 times")),
            "{d:?}"
        );
    }

    #[test]
    fn old_exits_leave_the_window() {
        let p = RestartPolicy::default();
        let mut exits = Vec::new();
        for i in 0..4 {
            decide(&p, true, &mut exits, exit(i * 10, false));
        }
        // Ten minutes later only this exit counts: a short back-off again.
        let d = decide(&p, true, &mut exits, exit(1000, false));
        assert_eq!(
            d,
            Decision::Restart {
                after: Duration::from_secs(1)
            }
        );
        assert_eq!(exits.len(), 1);
    }

    #[test]
    fn power_off_restarts_at_once_unless_not_kept_alive() {
        let p = RestartPolicy::default();
        let mut exits = Vec::new();
        assert_eq!(
            decide(&p, true, &mut exits, exit(5, true)),
            Decision::Restart {
                after: Duration::ZERO
            }
        );
        let mut exits = Vec::new();
        assert_eq!(
            decide(&p, false, &mut exits, exit(5, true)),
            Decision::StayOff
        );
    }

    #[test]
    fn backoff_is_capped() {
        let p = RestartPolicy {
            max_exits: 100,
            window_secs: 10_000,
            max_backoff_secs: 30,
        };
        let mut exits = Vec::new();
        let mut last = Decision::StayOff;
        for i in 0..70 {
            last = decide(&p, true, &mut exits, exit(i, false));
        }
        assert_eq!(
            last,
            Decision::Restart {
                after: Duration::from_secs(30)
            }
        );
    }
}
