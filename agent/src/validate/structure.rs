//! The serde pass, made to report every structural error instead of the first.
//!
//! serde stops at the first error. So: parse to a JSON tree, deserialize, and on an error record
//! it with its path (`serde_path_to_error`), cut the offending value out of the tree and try
//! again. A removed optional key falls back to its default; a removed required key shows up as
//! "missing field" on its parent, which is then cut too (the key itself was already reported).

use std::collections::BTreeSet;

use serde_json::Value;
use serde_path_to_error::Segment;

use super::{duplicates, Problem};
use crate::spec::DesiredState;

/// Bounds the retry loop; a document with more structural errors than this has bigger problems.
const MAX_STRUCTURAL_ERRORS: usize = 100;

pub(super) struct Structured {
    /// The document as parsed once the bad parts were cut out; `None` if the root was unusable.
    pub state: Option<DesiredState>,
    pub problems: Vec<Problem>,
    /// VMs that had a structural error somewhere inside them.
    pub broken_vms: BTreeSet<String>,
}

pub(super) fn deserialize(json: &str) -> Structured {
    let mut out = Structured {
        state: None,
        problems: Vec::new(),
        broken_vms: BTreeSet::new(),
    };
    // A BOM is reported, then looked past, so the rest of the file is checked too.
    let json = match json.strip_prefix('\u{feff}') {
        Some(rest) => {
            out.problems.push(Problem {
                path: String::new(),
                message: "the file starts with a UTF-8 BOM (byte order mark EF BB BF), which \
                          JSON does not allow: save it without one"
                    .into(),
            });
            rest
        }
        None => json,
    };
    let mut tree: Value = match serde_json::from_str(json) {
        Ok(tree) => tree,
        Err(error) => {
            out.problems.push(Problem {
                path: String::new(),
                message: format!("not valid JSON: {error}"),
            });
            return out;
        }
    };
    for path in duplicates::repeated_keys(json) {
        mark_broken(&mut out.broken_vms, &path);
        out.problems.push(Problem {
            path: render_path(&path),
            message: "key given twice in one object (JSON keeps only the last; say it once)".into(),
        });
    }
    if !tree.is_object() {
        out.problems.push(Problem {
            path: String::new(),
            message: format!(
                "the document must be a JSON object ({{\"version\": 1, \"vms\": {{...}}}}), not {}",
                kind(&tree)
            ),
        });
        return out;
    }
    // serde would take a struct from an array of its fields in order: nobody means that.
    for path in arrays_for_objects(&tree) {
        mark_broken(&mut out.broken_vms, &path);
        out.problems.push(Problem {
            path: render_path(&path),
            message: "must be an object, not an array".into(),
        });
        remove(&mut tree, &path);
    }
    let mut reported = BTreeSet::new();
    for _ in 0..MAX_STRUCTURAL_ERRORS {
        let error = match serde_path_to_error::deserialize::<_, DesiredState>(&tree) {
            Ok(state) => {
                out.state = Some(state);
                return out;
            }
            Err(error) => error,
        };
        let path: Vec<String> = error.path().iter().map(segment_key).collect();
        let message = error.into_inner().to_string();
        mark_broken(&mut out.broken_vms, &path);
        // "missing field `x`" after `x` was cut out for a bad value: already reported.
        let missing = missing_field(&message).map(|field| child(&path, field));
        if !matches!(&missing, Some(full) if reported.contains(full)) {
            out.problems.push(Problem {
                path: render_path(&path),
                message,
            });
        }
        reported.insert(missing.unwrap_or_else(|| path.clone()));
        if !remove(&mut tree, &path) {
            return out;
        }
    }
    out
}

/// The places where the schema has a struct (a VM, a disk, a NIC, `ha`) that hold an array.
fn arrays_for_objects(tree: &Value) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let Some(vms) = tree.get("vms").and_then(Value::as_object) else {
        return found;
    };
    let path = |keys: &[&str]| keys.iter().map(|k| k.to_string()).collect::<Vec<_>>();
    for (name, vm) in vms {
        if vm.is_array() {
            found.push(path(&["vms", name]));
            continue;
        }
        if vm.get("ha").is_some_and(Value::is_array) {
            found.push(path(&["vms", name, "ha"]));
        }
        for devices in ["disks", "nics"] {
            let Some(map) = vm.get(devices).and_then(Value::as_object) else {
                continue;
            };
            for (id, _) in map.iter().filter(|(_, device)| device.is_array()) {
                found.push(path(&["vms", name, devices, id]));
            }
        }
    }
    found
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A VM with a structural problem inside gets no semantic checks (they would be guesses).
fn mark_broken(broken_vms: &mut BTreeSet<String>, path: &[String]) {
    if let [first, name, ..] = path {
        if first == "vms" {
            broken_vms.insert(name.clone());
        }
    }
}

fn segment_key(segment: &Segment) -> String {
    match segment {
        Segment::Seq { index } => index.to_string(),
        Segment::Map { key } => key.clone(),
        Segment::Enum { variant } => variant.clone(),
        Segment::Unknown => "?".to_owned(),
    }
}

fn missing_field(message: &str) -> Option<&str> {
    message.strip_prefix("missing field `")?.split('`').next()
}

fn child(path: &[String], key: &str) -> Vec<String> {
    let mut full = path.to_vec();
    full.push(key.to_owned());
    full
}

/// Cuts the value at `path` out of the tree. False when there is nothing left to cut (the root).
fn remove(tree: &mut Value, path: &[String]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut node = tree;
    for key in parents {
        node = match node {
            Value::Object(map) => match map.get_mut(key) {
                Some(next) => next,
                None => return false,
            },
            _ => return false,
        };
    }
    match node {
        Value::Object(map) => map.remove(last).is_some(),
        _ => false,
    }
}

/// `vms.web.nics.eth0.mac`; keys that would make the path ambiguous are quoted:
/// `vms["my.vm"]`.
pub(super) fn render_path<S: AsRef<str>>(path: &[S]) -> String {
    let mut out = String::new();
    for key in path {
        let key = key.as_ref();
        let plain = !key.is_empty()
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if plain {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(key);
        } else {
            out.push('[');
            out.push_str(&serde_json::to_string(key).expect("a string serializes"));
            out.push(']');
        }
    }
    out
}
