//! Exponential back-off with jitter, for every retry loop in tron: the delays double from `first`
//! up to `max`, and each is drawn from its upper half so that many instances that failed together
//! do not retry together.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    first: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Self {
        Backoff { next: first, first, max: max.max(first) }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let full = self.next;
        self.next = (self.next * 2).min(self.max);
        let half = full / 2;
        half + half.mul_f64(rand::random::<f64>())
    }

    /// After a success: the next failure starts from `first` again.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_jitter_in_the_upper_half() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let bounds = [100, 200, 400, 800, 800];
        for full in bounds {
            let d = b.next_delay().as_millis() as u64;
            assert!(d >= full / 2 && d <= full, "{d} not in [{}, {full}]", full / 2);
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
