//! Spending caps: budget periods in UTC (day `YYYY-MM-DD`, month `YYYY-MM`), when they roll
//! over, and whether a reservation fits. Pure arithmetic; the stores apply it atomically.

use serde::{Deserialize, Serialize};

const MS_PER_DAY: u64 = 86_400_000;

/// A tenant's caps in USD; `None` (or a non-positive amount) means no cap for that period.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct BudgetCaps {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daily_usd: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monthly_usd: Option<f64>,
}

impl BudgetCaps {
    /// Caps from two amounts where 0 means "no cap".
    pub fn from_amounts(daily_usd: f64, monthly_usd: f64) -> BudgetCaps {
        let cap = |v: f64| (v.is_finite() && v > 0.0).then_some(v);
        BudgetCaps {
            daily_usd: cap(daily_usd),
            monthly_usd: cap(monthly_usd),
        }
    }

    /// Whether any period is capped.
    pub fn is_capped(&self) -> bool {
        self.daily().is_some() || self.monthly().is_some()
    }

    pub fn daily(&self) -> Option<f64> {
        self.daily_usd.filter(|v| v.is_finite() && *v > 0.0)
    }

    pub fn monthly(&self) -> Option<f64> {
        self.monthly_usd.filter(|v| v.is_finite() && *v > 0.0)
    }
}

/// The budget periods that contain one instant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Periods {
    /// YYYY-MM-DD (UTC).
    pub day: String,
    /// YYYY-MM (UTC).
    pub month: String,
    /// Start of the next day (ms since the epoch).
    pub next_day_ms: u64,
    /// Start of the next month (ms since the epoch).
    pub next_month_ms: u64,
}

impl Periods {
    /// The periods containing `now_ms` (ms since the Unix epoch, UTC).
    pub fn at(now_ms: u64) -> Periods {
        let days = now_ms / MS_PER_DAY;
        let (y, m, d) = civil_from_days(days as i64);
        let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
        Periods {
            day: format!("{y:04}-{m:02}-{d:02}"),
            month: format!("{y:04}-{m:02}"),
            next_day_ms: (days + 1) * MS_PER_DAY,
            next_month_ms: (days_from_civil(ny, nm, 1).max(0) as u64) * MS_PER_DAY,
        }
    }
}

/// Which period refused a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Day,
    Month,
}

/// Money counted against one period: booked by the ledger and held by live reservations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Counted {
    pub spent_usd: f64,
    pub reserved_usd: f64,
}

/// Whether `amount` may be reserved on top of what a period already counts. A reservation is
/// admitted while spent + reserved is still under the cap, so a period ends at most one
/// estimate over it: checking "spent + reserved + amount ≤ cap" instead would refuse the
/// last request of a nearly spent budget forever, and requests are estimated, not exact.
pub fn fits(counted: Counted, cap: Option<f64>) -> bool {
    match cap {
        None => true,
        Some(cap) => counted.spent_usd + counted.reserved_usd < cap,
    }
}

/// The first period whose cap refuses a reservation, if any (day is checked first).
pub fn refusing(caps: &BudgetCaps, day: Counted, month: Counted) -> Option<Period> {
    if !fits(day, caps.daily()) {
        Some(Period::Day)
    } else if !fits(month, caps.monthly()) {
        Some(Period::Month)
    } else {
        None
    }
}

/// When a refused request may try again: the start of the refusing period's successor.
pub fn retry_at_ms(periods: &Periods, period: Period) -> u64 {
    match period {
        Period::Day => periods.next_day_ms,
        Period::Month => periods.next_month_ms,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (era-based civil calendar maths).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The inverse of [`days_from_civil`].
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-11-30T19:33:08Z
    const NOV_30: u64 = 1_796_067_188_000;

    #[test]
    fn periods_are_the_utc_day_and_month_of_the_instant() {
        let p = Periods::at(NOV_30);
        assert_eq!(p.day, "2026-11-30");
        assert_eq!(p.month, "2026-11");
        assert_eq!(Periods::at(0).day, "1970-01-01");
    }

    #[test]
    fn the_next_day_and_month_start_at_utc_midnight() {
        let p = Periods::at(NOV_30);
        assert_eq!(Periods::at(p.next_day_ms).day, "2026-12-01");
        assert_eq!(Periods::at(p.next_day_ms - 1).day, "2026-11-30");
        // The month after November starts on December 1st, which is also the next day here.
        assert_eq!(p.next_month_ms, p.next_day_ms);
        let dec = Periods::at(p.next_day_ms);
        assert_eq!(Periods::at(dec.next_month_ms).month, "2027-01");
        assert_eq!(Periods::at(dec.next_month_ms - 1).day, "2026-12-31");
    }

    #[test]
    fn leap_days_are_days() {
        // 2028-02-28T12:00:00Z
        let feb28 = (days_from_civil(2028, 2, 28) as u64) * MS_PER_DAY + 43_200_000;
        let p = Periods::at(feb28);
        assert_eq!(Periods::at(p.next_day_ms).day, "2028-02-29");
        assert_eq!(Periods::at(p.next_month_ms).day, "2028-03-01");
    }

    #[test]
    fn civil_dates_round_trip() {
        for days in (-800_000..800_000).step_by(997) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn a_reservation_fits_while_spent_and_reserved_are_under_the_cap() {
        let c = |s, r| Counted {
            spent_usd: s,
            reserved_usd: r,
        };
        assert!(fits(c(0.0, 0.0), Some(0.05)));
        assert!(fits(c(0.03, 0.019), Some(0.05)));
        assert!(!fits(c(0.03, 0.02), Some(0.05)));
        assert!(!fits(c(0.06, 0.0), Some(0.05)));
        assert!(fits(c(1e9, 1e9), None));
    }

    #[test]
    fn zero_or_negative_amounts_mean_no_cap() {
        let caps = BudgetCaps::from_amounts(0.0, -1.0);
        assert!(!caps.is_capped());
        let caps = BudgetCaps {
            daily_usd: Some(0.0),
            monthly_usd: Some(10.0),
        };
        assert_eq!(caps.daily(), None);
        assert_eq!(caps.monthly(), Some(10.0));
    }

    #[test]
    fn the_day_refuses_first_and_the_retry_waits_for_its_rollover() {
        let caps = BudgetCaps::from_amounts(1.0, 5.0);
        let p = Periods::at(NOV_30);
        let full = Counted {
            spent_usd: 1.0,
            reserved_usd: 0.0,
        };
        let month_full = Counted {
            spent_usd: 5.0,
            reserved_usd: 0.0,
        };
        assert_eq!(refusing(&caps, full, month_full), Some(Period::Day));
        assert_eq!(
            refusing(&caps, Counted::default(), month_full),
            Some(Period::Month)
        );
        assert_eq!(
            refusing(&caps, Counted::default(), Counted::default()),
            None
        );
        assert_eq!(retry_at_ms(&p, Period::Day), p.next_day_ms);
        assert_eq!(retry_at_ms(&p, Period::Month), p.next_month_ms);
    }
}
