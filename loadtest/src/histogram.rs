//! Latency histograms: how they are made (microseconds, up to a minute), the form they
//! take in a report, and the percentiles every table shows.
//!
//! Every histogram in a report is HdrHistogram's V2 (deflate) serialization in standard
//! Base64 (the form HdrHistogram's log tools read), so reports from several machines can
//! be added exactly. A leaf: [`crate::report`], [`crate::stalls`], [`crate::engine`] and
//! [`crate::hsm`] use it, and it uses nothing of the crate but [`Error`].

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hdrhistogram::serialization::{Deserializer, Serializer, V2DeflateSerializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::Error;

/// A latency histogram in microseconds, up to a minute, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    let mut h = Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
    h.auto(true);
    h
}

/// A coarser histogram (2 significant digits) for per-second points.
pub fn new_second_histogram() -> Histogram<u64> {
    let mut h = Histogram::new_with_bounds(1, 60_000_000, 2).expect("valid bounds");
    h.auto(true);
    h
}

/// Base64 of the V2 deflate serialization.
pub fn encode_histogram(h: &Histogram<u64>) -> String {
    let mut bytes = Vec::new();
    V2DeflateSerializer::new()
        .serialize(h, &mut bytes)
        .expect("serializing into memory cannot fail");
    STANDARD.encode(bytes)
}

/// The inverse of [`encode_histogram`].
pub fn decode_histogram(text: &str) -> Result<Histogram<u64>, Error> {
    let bytes = STANDARD
        .decode(text)
        .map_err(|e| format!("histogram is not Base64: {e}"))?;
    let mut h: Histogram<u64> = Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| format!("histogram does not deserialize: {e:?}"))?;
    h.auto(true);
    Ok(h)
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// The percentiles every table shows, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th.
    pub p90: f64,
    /// 99th.
    pub p99: f64,
    /// 99.9th.
    pub p99_9: f64,
    /// 99.99th.
    pub p99_99: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

impl Percentiles {
    /// From a histogram in microseconds.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p99_9: ms(h.value_at_quantile(0.999)),
            p99_99: ms(h.value_at_quantile(0.9999)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_round_trip_through_base64() {
        let mut h = new_histogram();
        for v in [1, 10, 100, 1_000, 250_000] {
            h.record(v).unwrap();
        }
        let back = decode_histogram(&encode_histogram(&h)).unwrap();
        assert_eq!(back.len(), 5);
        assert_eq!(back.max(), h.max());
        assert!(decode_histogram("not base64!").is_err());
    }
}
