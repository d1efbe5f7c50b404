//! Lanes: how a batch is split for concurrent processing without losing per-vehicle order, and how
//! the results are put back in offset order so only a contiguous prefix is ever committed.
//!
//! A partition's records are spread over lanes by a hash of the record's routing key. The receiver
//! keys every record by its vehicle id (the event id when there is none), so all events of one
//! vehicle, and every copy of one event id, land in the same lane of a partition and are processed
//! one after another in offset order; different vehicles run concurrently. Records without a key
//! (written by other producers) are routed by the same key sniffed from the body.
//!
//! Resequencing: a lane stops at its first transient failure, and the partition's committable
//! result is the records before the lowest failed offset of any of its lanes, in offset order.
//! Records of other lanes past that offset may have been applied already; they are not committed,
//! are fetched again after the rewind, find their own claim and are applied again (idempotent).

use std::collections::BTreeMap;

use rdkafka::message::{Message, OwnedMessage};

/// The routing key of a record: its Kafka key, or the key the receiver would have given its body.
pub fn routing_key(msg: &OwnedMessage) -> Vec<u8> {
    match msg.key() {
        Some(k) if !k.is_empty() => k.to_vec(),
        _ => shared::envelope::Routing::sniff(msg.payload().unwrap_or_default())
            .key()
            .map(|k| k.as_bytes().to_vec())
            .unwrap_or_default(),
    }
}

/// FNV-1a: a fixed hash, so a key's lane does not depend on the process.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// One lane: records of one partition, in offset order, whose keys hash to the same slot.
#[derive(Debug)]
pub struct Lane {
    pub partition: i32,
    pub records: Vec<OwnedMessage>,
}

/// Splits one partition's records (offsets increasing) into at most `lanes` lanes by routing key,
/// keeping offset order inside each lane.
pub fn split(partition: i32, records: Vec<OwnedMessage>, lanes: usize) -> Vec<Lane> {
    let lanes = lanes.max(1) as u64;
    let mut by_slot: BTreeMap<u64, Vec<OwnedMessage>> = BTreeMap::new();
    for m in records {
        let slot = fnv1a(&routing_key(&m)) % lanes;
        by_slot.entry(slot).or_default().push(m);
    }
    by_slot
        .into_values()
        .map(|records| Lane { partition, records })
        .collect()
}

/// What one lane achieved: its finished records (in offset order) and where it stopped.
#[derive(Debug)]
pub struct LaneResult<T> {
    pub done: Vec<(i64, T)>,
    /// The offset that failed transiently, and why.
    pub failed: Option<(i64, String)>,
}

/// One partition put back together.
#[derive(Debug)]
pub struct Resequenced<T> {
    /// The contiguous finished prefix, in offset order: everything before the first failure.
    pub done: Vec<(i64, T)>,
    /// The lowest failed offset of any lane: where the partition is rewound to.
    pub failed: Option<(i64, String)>,
    /// Finished records past the failure: applied, but neither committed nor reported; they are
    /// processed again after the rewind.
    pub discarded: Vec<(i64, T)>,
}

/// Merges a partition's lane results in offset order and keeps only the prefix before the lowest
/// failed offset.
pub fn resequence<T>(results: Vec<LaneResult<T>>) -> Resequenced<T> {
    let mut failed: Option<(i64, String)> = None;
    let mut done = Vec::new();
    for r in results {
        if let Some((o, why)) = r.failed {
            if failed.as_ref().is_none_or(|(f, _)| o < *f) {
                failed = Some((o, why));
            }
        }
        done.extend(r.done);
    }
    done.sort_by_key(|(o, _)| *o);
    let discarded = match &failed {
        Some((f, _)) => {
            let cut = done.partition_point(|(o, _)| o < f);
            done.split_off(cut)
        }
        None => Vec::new(),
    };
    Resequenced {
        discarded,
        done,
        failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Timestamp;

    fn rec(offset: i64, key: &str) -> OwnedMessage {
        OwnedMessage::new(
            Some(format!(r#"{{"eventId":"e{offset}","vehicleId":"{key}"}}"#).into_bytes()),
            (!key.is_empty()).then(|| key.as_bytes().to_vec()),
            "t".into(),
            Timestamp::NotAvailable,
            0,
            offset,
            None,
        )
    }

    #[test]
    fn one_vehicle_stays_in_one_lane_in_offset_order() {
        let vehicles = ["car-a", "car-b", "car-c", "car-d", "car-e"];
        let records: Vec<_> = (0..50).map(|o| rec(o, vehicles[o as usize % 5])).collect();
        let lanes = split(0, records, 3);
        assert!(lanes.len() > 1, "vehicles spread over lanes");
        for v in vehicles {
            let holding: Vec<&Lane> = lanes
                .iter()
                .filter(|l| l.records.iter().any(|m| m.key() == Some(v.as_bytes())))
                .collect();
            assert_eq!(holding.len(), 1, "{v} is in exactly one lane");
        }
        for l in &lanes {
            let offsets: Vec<i64> = l.records.iter().map(Message::offset).collect();
            assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
        }
        let total: usize = lanes.iter().map(|l| l.records.len()).sum();
        assert_eq!(total, 50);
    }

    #[test]
    fn records_without_a_key_follow_the_vehicle_in_their_body() {
        let keyed = rec(1, "car-z");
        let bare_body = OwnedMessage::new(
            Some(br#"{"eventId":"x","vehicleId":"car-z"}"#.to_vec()),
            None,
            "t".into(),
            Timestamp::NotAvailable,
            0,
            2,
            None,
        );
        assert_eq!(routing_key(&keyed), routing_key(&bare_body));
        let lanes = split(0, vec![keyed, bare_body], 64);
        assert_eq!(lanes.len(), 1);
    }

    #[test]
    fn only_the_prefix_before_the_lowest_failure_is_committable() {
        // Lane A finished 0, 2, 5; lane B finished 1, then failed at 3; lane C finished 4, 6
        // (later records finished first).
        let r = resequence(vec![
            LaneResult {
                done: vec![(0, 'a'), (2, 'a'), (5, 'a')],
                failed: None,
            },
            LaneResult {
                done: vec![(1, 'b')],
                failed: Some((3, "timeout".into())),
            },
            LaneResult {
                done: vec![(4, 'c'), (6, 'c')],
                failed: None,
            },
        ]);
        let offsets: Vec<i64> = r.done.iter().map(|(o, _)| *o).collect();
        assert_eq!(offsets, vec![0, 1, 2]);
        assert_eq!(r.failed.map(|(o, _)| o), Some(3));
        assert_eq!(
            r.discarded.iter().map(|(o, _)| *o).collect::<Vec<_>>(),
            vec![4, 5, 6]
        );
    }

    #[test]
    fn without_failures_everything_is_committable_in_offset_order() {
        let r = resequence(vec![
            LaneResult {
                done: vec![(7, ()), (9, ())],
                failed: None,
            },
            LaneResult {
                done: vec![(8, ())],
                failed: None,
            },
        ]);
        let offsets: Vec<i64> = r.done.iter().map(|(o, _)| *o).collect();
        assert_eq!(offsets, vec![7, 8, 9]);
        assert!(r.failed.is_none());
    }
}
