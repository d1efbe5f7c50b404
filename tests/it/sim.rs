//! End-to-end correctness: a seeded smartcar-sim round with every fault mix on, through the real
//! receiver and processor, compared with the simulator's ground truth.

use std::time::{Duration, Instant};

use carhook_tests::sim::{self, generate::Faults};
use carhook_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn simulated_traffic_with_every_fault_matches_ground_truth() {
    let s = settings(&[]);
    let r = spawn_receiver(&s).await;
    let p = spawn_processor(&s).await;
    let faults = Faults::all();
    let events = sim::generate::generate(20_251_129, 12, 20, faults);
    let (deliveries, report) =
        sim::send::send_all(r.addr, &s.receiver.path, TOKEN, &events, 16, 0.002, None).await;
    assert_eq!(report.dropped_after_4_attempts, 0, "{report:?}");
    assert!(
        report.unauthorized_401 > 0 && report.duplicates_sent > 0,
        "faults were exercised: {report:?}"
    );
    let run = sim::Run::new(1, faults, &events, deliveries, report);
    assert!(!run.truth.actions.is_empty() && !run.truth.rejected.is_empty());
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let diff = sim::check::diff(&s, &run.truth, &run.deliveries).await;
        if diff.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "system differs from ground truth:\n{}",
            diff.join("\n")
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    p.stop().await;
    r.stop().await;
    drop_keyspace(&s).await;
}
