//! When sessions run their periodic timers (heartbeat pings, Pusher liveness checks).
//!
//! Every timer that fires wakes a server thread, and on the build VM a wake-up costs more
//! than the ping it sends: with timers spread at nanosecond resolution, 19,000 idle sockets
//! pinging every 20 s woke the two worker threads ~1,500 times a second, and 30% of the idle
//! server's CPU went to switching into them (`finish_task_switch`). So timers start on a
//! process-wide grid of [`SLOT`]: at a random slot of their first period, so that sockets
//! that connect together still spread their pings over the period, while all the timers due
//! in one slot fire in one wake-up.

use std::sync::OnceLock;
use std::time::Duration;

use actix::clock::Instant;

/// The grid's step. At 19,000 sockets and 20 s, ~48 pings share a slot.
pub const SLOT: Duration = Duration::from_millis(50);

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// The first tick of a timer of this period: a random slot boundary after now and within
/// about one period. Later ticks (first + n × period) stay on the grid when the period is a
/// whole number of slots, as every configurable one is.
pub fn first_tick(period: Duration) -> Instant {
    use rand::Rng;
    let epoch = *EPOCH.get_or_init(Instant::now);
    let slots = slots_in(period);
    let pick = rand::thread_rng().gen_range(0..slots);
    tick_after(epoch, Instant::now(), pick)
}

/// How many slots a period spans (at least one).
fn slots_in(period: Duration) -> u64 {
    u64::try_from(period.as_nanos() / SLOT.as_nanos())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// The `pick`-th slot boundary (from 0) strictly after `now`, on the grid starting at `epoch`.
fn tick_after(epoch: Instant, now: Instant, pick: u64) -> Instant {
    let slot_ns = SLOT.as_nanos();
    let since = now.saturating_duration_since(epoch).as_nanos();
    let index = since / slot_ns + 1 + u128::from(pick);
    let offset = u64::try_from(index * slot_ns).unwrap_or(u64::MAX);
    epoch + Duration::from_nanos(offset)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn on_grid(epoch: Instant, t: Instant) -> bool {
        t.duration_since(epoch).as_nanos() % SLOT.as_nanos() == 0
    }

    #[test]
    fn ticks_fall_on_the_grid_after_now() {
        let epoch = Instant::now();
        let now = epoch + Duration::from_millis(1234) + Duration::from_nanos(17);
        let first = tick_after(epoch, now, 0);
        assert!(on_grid(epoch, first));
        assert!(first > now && first - now <= SLOT, "{:?}", first - now);
        let last = tick_after(epoch, now, slots_in(Duration::from_secs(20)) - 1);
        assert!(on_grid(epoch, last));
        assert!(last - now <= Duration::from_secs(20) + SLOT);
        // Exactly on a boundary: the next one.
        let at = epoch + SLOT * 3;
        assert_eq!(tick_after(epoch, at, 0), epoch + SLOT * 4);
    }

    #[test]
    fn first_ticks_share_slots_and_spread_over_the_period() {
        let period = Duration::from_secs(20);
        let now = Instant::now();
        let firsts: Vec<Instant> = (0..2000).map(|_| first_tick(period)).collect();
        let epoch = *EPOCH.get().expect("set by first_tick");
        assert!(firsts.iter().all(|t| on_grid(epoch, *t)));
        assert!(firsts
            .iter()
            .all(|t| *t > now && t.duration_since(now) <= period + SLOT * 2));
        // 2,000 timers in 400 slots: shared, yet over most of the period (σ of a quarter ≈ 19).
        let distinct: HashSet<Instant> = firsts.iter().copied().collect();
        assert!(
            distinct.len() < 2000 && distinct.len() > 300,
            "{}",
            distinct.len()
        );
        for q in 0..4 {
            let (from, to) = (period * q / 4, period * (q + 1) / 4);
            let n = firsts
                .iter()
                .filter(|t| {
                    let d = t.duration_since(now);
                    d > from && d <= to
                })
                .count();
            assert!(n > 350, "quarter {q} got {n} of 2000");
        }
    }

    #[test]
    fn a_period_shorter_than_a_slot_takes_the_next_slot() {
        assert_eq!(slots_in(Duration::ZERO), 1);
        assert_eq!(slots_in(Duration::from_millis(10)), 1);
        let now = Instant::now();
        let t = first_tick(Duration::from_millis(10));
        assert!(t > now && t.duration_since(now) <= SLOT * 2);
    }
}
