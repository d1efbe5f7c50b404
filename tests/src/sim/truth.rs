//! Ground truth: what the system must hold after a `send`, computed from the simulator's own model
//! of the events it delivered (never from the code under test).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::generate::{SimEvent, SimKind};

/// Expected state of one signal.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SignalTruth {
    /// The freshest value (None when only an error/unsupported status was ever delivered).
    pub body: Option<Value>,
    pub event_id: Option<String>,
    value_t: i64,
    /// `available`, `unavailable` or `unsupported`.
    pub status: String,
    status_t: i64,
}

/// Expected state of one vehicle.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VehicleTruth {
    pub signals: BTreeMap<String, SignalTruth>,
    /// Per error key: (time, active, needs reconnect).
    errors: BTreeMap<String, (i64, bool, bool)>,
}

impl VehicleTruth {
    /// Whether an active error asks the user to reconnect.
    pub fn needs_reconnect(&self) -> bool {
        self.errors
            .values()
            .any(|(_, active, reconnect)| *active && *reconnect)
    }

    /// Signals marked not supported.
    pub fn unsupported(&self) -> BTreeSet<String> {
        self.signals
            .iter()
            .filter(|(_, s)| s.status == "unsupported")
            .map(|(c, _)| c.clone())
            .collect()
    }

    fn status(&mut self, code: &str, t: i64, status: &str) {
        let e = self
            .signals
            .entry(code.to_string())
            .or_insert_with(|| SignalTruth {
                body: None,
                event_id: None,
                value_t: i64::MIN,
                status: status.to_string(),
                status_t: i64::MIN,
            });
        if t > e.status_t {
            e.status = status.to_string();
            e.status_t = t;
        }
    }
}

/// Everything `check` compares.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Truth {
    pub vehicles: BTreeMap<String, VehicleTruth>,
    /// Vehicles that must have no state at all (only unknown or rejected events).
    pub absent: BTreeSet<String>,
    /// Action ids (`eventId:index`) that may be on the actions topic, each at most once: the
    /// reconnect-relevant items of acknowledged events. Which of them appear depends on the order
    /// the events reached the processor; what must hold is in `flags`.
    pub actions: BTreeSet<String>,
    /// Per vehicle, per reconnect-relevant error key: whether the flag ends set (the latest delivery
    /// says ERROR). The actions of each flag must alternate, starting with `RECONNECT_REQUIRED`, and
    /// the last must agree with this.
    pub flags: BTreeMap<String, BTreeMap<String, bool>>,
    /// Event ids whose every delivery had to be refused (invalid signature).
    pub rejected: BTreeSet<String>,
    /// Event ids of VERIFY challenges: answered with the right HMAC, never stored.
    #[serde(default)]
    pub verifies: BTreeSet<String>,
    /// Event ids that never got a 2xx in 4 attempts although they should have.
    pub dropped: BTreeSet<String>,
    /// Dead letters expected (the simulator sends no poison).
    pub dead_letters: usize,
}

impl Truth {
    /// Every vehicle this run sent events for: `check` judges records of these only.
    pub fn run_vehicles(&self) -> BTreeSet<String> {
        self.vehicles
            .keys()
            .chain(&self.absent)
            .chain(self.flags.keys())
            .cloned()
            .collect()
    }

    /// Builds the truth from the events and, per acknowledged event, the attempt that was
    /// acknowledged (whose `deliveredAt` orders the event's availability, errors and flags).
    pub fn compute(events: &[SimEvent], acknowledged: &BTreeMap<String, u32>) -> Self {
        let mut t = Self::default();
        let mut seen: BTreeSet<String> = BTreeSet::new();
        let mut flag_times: BTreeMap<(String, String), (i64, bool)> = BTreeMap::new();
        for e in events {
            if matches!(e.kind, SimKind::Verify { .. }) {
                t.verifies.insert(e.event_id.clone());
                if !acknowledged.contains_key(&e.event_id) {
                    t.dropped.insert(e.event_id.clone());
                }
                continue;
            }
            seen.insert(e.vehicle.clone());
            if e.bad_signature {
                t.rejected.insert(e.event_id.clone());
                continue;
            }
            let Some(&attempt) = acknowledged.get(&e.event_id) else {
                t.dropped.insert(e.event_id.clone());
                continue;
            };
            // The delivery clock of the copy that owns the event's claim, as the system reads it.
            let dt = super::generate::delivered_as_read(e, attempt);
            match &e.kind {
                SimKind::Unknown | SimKind::Verify { .. } => {}
                SimKind::Legacy(_, vehicles) => {
                    // Legacy paths are stored as `v2-<path>`; each path always answers the same way
                    // here, so their availability has one value whatever the order.
                    let id = e.stored_id();
                    for lv in vehicles {
                        seen.insert(lv.vehicle.clone());
                        let v = t.vehicles.entry(lv.vehicle.clone()).or_default();
                        if let Some((distance, at)) = lv.odometer {
                            v.status("v2-odometer", dt, "available");
                            if let Some(st) = v.signals.get_mut("v2-odometer") {
                                if at > st.value_t {
                                    st.body = Some(serde_json::json!({ "distance": distance }));
                                    st.event_id = Some(id.clone());
                                    st.value_t = at;
                                }
                            }
                        }
                        if lv.battery_asleep {
                            v.status("v2-battery", dt, "unavailable");
                        }
                    }
                }
                SimKind::State(signals) => {
                    let v = t.vehicles.entry(e.vehicle.clone()).or_default();
                    for s in signals {
                        match (&s.body, &s.error) {
                            (Some(body), _) => {
                                // Availability follows the delivery clock, the value the car's.
                                v.status(&s.code, dt, "available");
                                if let Some(st) = v.signals.get_mut(&s.code) {
                                    if s.oem > st.value_t {
                                        st.body = Some(body.clone());
                                        st.event_id = Some(e.event_id.clone());
                                        st.value_t = s.oem;
                                    }
                                }
                            }
                            (None, err) => {
                                let not_capable = err.as_ref().is_some_and(|(_, c)| {
                                    c.as_deref() == Some("VEHICLE_NOT_CAPABLE")
                                });
                                v.status(
                                    &s.code,
                                    dt,
                                    if not_capable {
                                        "unsupported"
                                    } else {
                                        "unavailable"
                                    },
                                );
                            }
                        }
                    }
                }
                SimKind::Errors(errors) => {
                    let v = t.vehicles.entry(e.vehicle.clone()).or_default();
                    for (i, x) in errors.iter().enumerate() {
                        let entry = v.errors.entry(x.key()).or_insert((i64::MIN, false, false));
                        if dt > entry.0 {
                            *entry = (dt, !x.resolved, x.needs_reconnect());
                        }
                        if x.code.as_deref() == Some("VEHICLE_NOT_CAPABLE") {
                            for code in &x.signals {
                                v.status(
                                    code,
                                    dt,
                                    if x.resolved {
                                        "available"
                                    } else {
                                        "unsupported"
                                    },
                                );
                            }
                        }
                        if x.needs_reconnect() {
                            t.actions.insert(format!("{}:{i}", e.event_id));
                            flag_times
                                .entry((e.vehicle.clone(), x.key()))
                                .and_modify(|(ft, set)| {
                                    if dt > *ft {
                                        (*ft, *set) = (dt, !x.resolved);
                                    }
                                })
                                .or_insert((dt, !x.resolved));
                        }
                    }
                }
            }
        }
        for ((vehicle, key), (_, set)) in flag_times {
            t.flags.entry(vehicle).or_default().insert(key, set);
        }
        t.absent = seen
            .into_iter()
            .filter(|v| !t.vehicles.contains_key(v))
            .collect();
        t
    }
}

/// What Smartcar's REST API knows about one vehicle: the user it is connected for and its
/// current readings (code → body and the car's time, epoch ms). The fake API serves exactly
/// this, so a test knows what a poll must bring into the store.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ApiVehicle {
    pub user_id: String,
    pub signals: BTreeMap<String, (Value, i64)>,
}

impl ApiVehicle {
    /// A vehicle of `user` with `signals` (code, body, oemUpdatedAt ms).
    pub fn new(user: &str, signals: &[(&str, Value, i64)]) -> Self {
        Self {
            user_id: user.to_string(),
            signals: signals
                .iter()
                .map(|(c, b, t)| ((*c).to_string(), (b.clone(), *t)))
                .collect(),
        }
    }
}
