//! Test bodies shared by the parse tests: every shape the protocol doc shows, the values a field
//! is tried with, and a way to set one field of a body.

/// Every body shape the protocol doc and the example files show.
pub(crate) fn protocol_shapes() -> Vec<serde_json::Value> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/protocol");
    let mut out = Vec::new();
    let examples = std::fs::read_dir(dir.join("examples")).unwrap_or_else(|e| panic!("{e}"));
    for entry in examples.flatten() {
        let raw = std::fs::read(entry.path()).unwrap_or_else(|e| panic!("{e}"));
        out.push(serde_json::from_slice(&raw).unwrap_or_else(|e| panic!("{e}")));
    }
    let examples_found = out.len();
    assert!(examples_found >= 4, "protocol examples missing");
    // The inline bodies of SMARTCAR.md (`{…}` in back-quotes) that are complete JSON.
    let doc = std::fs::read_to_string(dir.join("SMARTCAR.md")).unwrap_or_else(|e| panic!("{e}"));
    for quoted in doc.split('`').skip(1).step_by(2) {
        if let Ok(v @ serde_json::Value::Object(_)) = serde_json::from_str(quoted) {
            out.push(v);
        }
    }
    assert!(
        out.len() >= examples_found + 3,
        "SMARTCAR.md bodies missing"
    );
    out
}

/// Values every routing field is tried with: each JSON type, empty and escaped strings, and the
/// objects/arrays the other routing rules look into.
pub(crate) fn variants() -> Vec<Option<serde_json::Value>> {
    use serde_json::json;
    [
        json!("x-1"),
        json!(""),
        json!("ü \"q\" \\ \u{1F697} \n"),
        json!(5),
        json!(-1),
        json!(1.5e300),
        json!(18446744073709551615_u64),
        json!(true),
        json!(null),
        json!([]),
        json!(["a", {"vehicleId": "b"}]),
        json!([{"vehicleId": "first", "data": [{"path": "/odometer", "body": {"distance": 1}}]}, {"vehicleId": "second"}]),
        json!([{"vehicleId": 7}, {"vehicleId": "second"}]),
        json!({}),
        json!({"id": "obj-id", "vehicleId": "obj-vid", "challenge": "obj-ch", "eventId": "obj-ev", "deliveryId": "obj-d"}),
        json!({"vehicle": {"id": "nested"}, "vehicles": [{"vehicleId": "listed"}], "challenge": ["x"]}),
    ]
    .into_iter()
    .map(Some)
    .chain([None])
    .collect()
}

/// Sets (with `None`: removes) the value at `path` in `v`, a path of object keys and, in arrays,
/// indexes. Objects missing on the way are created; a path through any other value, or an index
/// past an array's end, changes nothing.
pub(crate) fn set_path(v: &mut serde_json::Value, path: &[&str], to: Option<serde_json::Value>) {
    use serde_json::Value;
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = v;
    for p in parents {
        cur = match cur {
            Value::Object(o) => o
                .entry(p.to_string())
                .or_insert_with(|| serde_json::json!({})),
            Value::Array(a) => match p.parse::<usize>().ok().and_then(|i| a.get_mut(i)) {
                Some(next) => next,
                None => return,
            },
            _ => return,
        };
    }
    match (cur, to) {
        (Value::Object(o), Some(x)) => {
            o.insert(last.to_string(), x);
        }
        (Value::Object(o), None) => {
            o.remove(*last);
        }
        (Value::Array(a), to) => match (last.parse::<usize>(), to) {
            (Ok(i), Some(x)) if i < a.len() => a[i] = x,
            (Ok(i), None) if i < a.len() => {
                a.remove(i);
            }
            _ => {}
        },
        _ => {}
    }
}

/// Every protocol shape, compact and pretty, then compact with each of `paths` set to each of
/// `variants` (`None` removes it), handed to `check`; returns how many bodies had a field set.
pub(crate) fn each_shape_with_each_field_set(
    paths: &[&[&str]],
    variants: &[Option<serde_json::Value>],
    mut check: impl FnMut(&[u8]),
) -> usize {
    let mut set = 0;
    for shape in protocol_shapes() {
        check(&serde_json::to_vec(&shape).unwrap_or_default());
        check(&serde_json::to_vec_pretty(&shape).unwrap_or_default());
        for path in paths {
            for to in variants {
                let mut v = shape.clone();
                set_path(&mut v, path, to.clone());
                check(&serde_json::to_vec(&v).unwrap_or_default());
                set += 1;
            }
        }
    }
    set
}
