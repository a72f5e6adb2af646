//! Property-based fuzzing of what the agent reads from others, bounded to run in CI in seconds
//! (a fixed number of cases each, see `CASES`):
//! - the desired-state parser and validator, on arbitrary text, arbitrary JSON and valid
//!   documents with random mutations: no panic, and every problem names where it is;
//! - the control protocol, on arbitrary bytes and mutated requests through the real server's
//!   framing over a real socket: no panic, a clear error, and the server keeps answering.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use plasmavmc_agent::control::protocol::{Request, Response};
use plasmavmc_agent::control::server;
use plasmavmc_agent::validate::{parse_desired_state, Problem};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{json, Map, Value};

/// Cases per property (8 properties; the two through the server run a quarter of it). Raise it
/// locally with PROPTEST_CASES=N for a longer run.
const CASES: u32 = 500;

fn runner(cases: u32) -> TestRunner {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(cases);
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    })
}

fn run<S: Strategy>(name: &str, cases: u32, strategy: S, test: impl Fn(S::Value))
where
    S::Value: std::fmt::Debug,
{
    let mut runner = runner(cases);
    let result = runner.run(&strategy, |value| {
        test(value);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
    eprintln!("fuzz {name}: {} cases", runner.config().cases);
}

// ---------------------------------------------------------------- desired state

/// A valid document with two VMs, every kind of field present.
fn valid() -> Value {
    json!({
        "version": 1,
        "vms": {
            "web": {
                "vcpus": 2, "maxVcpus": 4, "memoryMiB": 512, "maxMemoryMiB": 1024,
                "machine": "q35", "accel": "tcg",
                "kernel": "/boot/vmlinuz", "initrd": "/boot/initrd", "cmdline": "console=ttyS0",
                "disks": {
                    "root": {"path": "/var/lib/vms/web.qcow2", "format": "qcow2", "serial": "root"},
                    "data": {"path": "/dev/vg0/web-data", "format": "raw", "cache": "none"}
                },
                "nics": {"eth0": {"mac": "52:54:00:12:34:56", "bridge": "br0"}},
                "restartPolicy": "always", "ha": {"enable": false}
            },
            "db": {
                "vcpus": 1, "memoryMiB": 256, "bootDisk": "root", "machine": "pc",
                "disks": {"root": {"path": "/var/lib/vms/db.raw", "format": "raw", "readOnly": true}},
                "nics": {"eth0": {"mac": "52:54:00:12:34:57", "tap": "tap-db"}},
                "orgId": "acme", "projectId": "shop", "autostart": false
            }
        }
    })
}

/// Whether a problem says where it is: a path inside the document whose first segment is one of
/// the document's own top-level keys, or, for the document as a whole, a line and column, a
/// missing top-level field, a BOM, or the root's type.
fn names_a_place(problem: &Problem, doc: Option<&Value>) -> bool {
    if problem.path.is_empty() {
        let m = &problem.message;
        return m.contains(" line ")
            || m.starts_with("missing field `")
            || m.contains("UTF-8 BOM")
            || m.starts_with("the document must be a JSON object");
    }
    let first = problem
        .path
        .split(['.', '['])
        .next()
        .expect("split yields one item");
    match doc.and_then(Value::as_object) {
        Some(root) if !first.is_empty() => root.contains_key(first),
        // A quoted first key (`["odd key"]`).
        Some(root) => root
            .keys()
            .any(|k| problem.path.starts_with(&format!("[{}]", json!(k)))),
        None => true,
    }
}

fn check_document(text: &str, doc: Option<&Value>) {
    if let Err(errors) = parse_desired_state(text) {
        assert!(!errors.problems().is_empty(), "a rejection says why");
        for problem in errors.problems() {
            assert!(
                names_a_place(problem, doc),
                "{problem} does not say where, in:\n{text}"
            );
        }
    }
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e6f64..1e6).prop_map(Value::from),
        "[a-zA-Z0-9:/._ -]{0,12}".prop_map(Value::from),
        any::<String>().prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map(key(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Keys the schema knows, and some it does not.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "version",
            "vms",
            "web",
            "db",
            "vcpus",
            "maxVcpus",
            "memoryMiB",
            "maxMemoryMiB",
            "machine",
            "accel",
            "kernel",
            "initrd",
            "cmdline",
            "bootDisk",
            "firmware",
            "disks",
            "nics",
            "path",
            "format",
            "serial",
            "readOnly",
            "cache",
            "mac",
            "bridge",
            "tap",
            "hotplugSlots",
            "autostart",
            "restartPolicy",
            "onRestartRequired",
            "orgId",
            "projectId",
            "consoleLog",
            "ha",
            "enable",
            "root",
            "eth0",
        ])
        .prop_map(str::to_owned),
        "[a-zA-Z.\" -]{0,8}",
    ]
}

/// One change to a document: at the node `at` (an index into its nodes, wrapped) do `what`.
#[derive(Debug, Clone)]
enum Mutation {
    Replace(Value),
    Remove,
    Insert(String, Value),
    Rename(String),
}

fn mutation() -> impl Strategy<Value = (usize, Mutation)> {
    let what = prop_oneof![
        any_json().prop_map(Mutation::Replace),
        Just(Mutation::Remove),
        (key(), any_json()).prop_map(|(k, v)| Mutation::Insert(k, v)),
        key().prop_map(Mutation::Rename),
    ];
    (any::<usize>(), what)
}

/// Every object member of `doc` as its key path.
fn members(doc: &Value, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    if let Value::Object(map) = doc {
        for (k, v) in map {
            path.push(k.clone());
            out.push(path.clone());
            members(v, path, out);
            path.pop();
        }
    }
}

fn parent<'a>(doc: &'a mut Value, path: &[String]) -> &'a mut Map<String, Value> {
    let mut node = doc;
    for k in path {
        node = node.get_mut(k).expect("path from members()");
    }
    node.as_object_mut().expect("members are in objects")
}

fn mutate(doc: &mut Value, (at, mutation): &(usize, Mutation)) {
    let mut all = Vec::new();
    members(doc, &mut Vec::new(), &mut all);
    if all.is_empty() {
        return;
    }
    let path = &all[at % all.len()];
    let (last, up) = path.split_last().expect("a member has a key");
    let map = parent(doc, up);
    match mutation {
        Mutation::Replace(v) => {
            map.insert(last.clone(), v.clone());
        }
        Mutation::Remove => {
            map.remove(last);
        }
        Mutation::Insert(k, v) => {
            if let Some(Value::Object(inner)) = map.get_mut(last) {
                inner.insert(k.clone(), v.clone());
            }
        }
        Mutation::Rename(k) => {
            if let Some(v) = map.remove(last) {
                map.insert(k.clone(), v);
            }
        }
    }
}

#[test]
fn the_desired_state_parser_never_panics_and_every_problem_says_where() {
    run(
        "desired-state: arbitrary text",
        CASES,
        any::<String>(),
        |text| check_document(&text, None),
    );
    run("desired-state: arbitrary JSON", CASES, any_json(), |doc| {
        check_document(&doc.to_string(), Some(&doc))
    });
    run(
        "desired-state: mutated valid documents",
        CASES,
        prop::collection::vec(mutation(), 1..4),
        |mutations| {
            let mut doc = valid();
            for m in &mutations {
                mutate(&mut doc, m);
            }
            check_document(&doc.to_string(), Some(&doc));
        },
    );
    // Text-level damage a JSON tree cannot express: a key given twice, a BOM, a cut.
    run(
        "desired-state: repeated keys, BOM, truncation",
        CASES,
        (any::<usize>(), any::<bool>(), any::<usize>()),
        |(at, bom, cut)| {
            let text = valid().to_string();
            // `,"key":scalar` members, each as (start of the comma, end of the value).
            let members: Vec<(usize, usize)> = text
                .match_indices(",\"")
                .filter_map(|(i, _)| {
                    let end = i + 1 + text[i + 1..].find([',', '}'])?;
                    (!text[i..end].contains(['{', '['])).then_some((i, end))
                })
                .collect();
            let (i, end) = members[at % members.len()];
            let repeated = format!("{}{}{}", &text[..end], &text[i..end], &text[end..]);
            let damaged = if bom {
                format!("\u{feff}{repeated}")
            } else {
                repeated.clone()
            };
            let doc: Value = serde_json::from_str(&repeated).unwrap();
            let errors = parse_desired_state(&damaged).expect_err("a repeated key is refused");
            assert!(
                errors.to_string().contains("key given twice"),
                "{errors}\n{damaged}"
            );
            check_document(&damaged, Some(&doc));
            let cut = cut % damaged.len();
            if damaged.is_char_boundary(cut) {
                check_document(&damaged[..cut], None);
            }
        },
    );
}

// ---------------------------------------------------------------- control protocol

fn any_request() -> impl Strategy<Value = Value> {
    let name = prop::sample::select(vec![
        "status",
        "reload",
        "plan",
        "start",
        "stop",
        "reset",
        "clusterStatus",
        "nope",
    ]);
    (name, prop::collection::btree_map(key(), any_json(), 0..4)).prop_map(|(name, fields)| {
        let mut request: Map<String, Value> = fields.into_iter().collect();
        request.insert("request".into(), name.into());
        Value::Object(request)
    })
}

#[test]
fn the_request_decoder_never_panics() {
    run(
        "protocol: arbitrary bytes",
        CASES,
        any::<Vec<u8>>(),
        |bytes| {
            let _ = serde_json::from_slice::<Request>(&bytes);
        },
    );
    run(
        "protocol: mutated requests",
        CASES,
        any_request(),
        |request| {
            if let Ok(Request::Plan {
                desired: Some(document),
            }) = serde_json::from_value::<Request>(request.clone())
            {
                // The document is handed on as sent: the same JSON, then validated like a file.
                let sent = &request["desired"];
                let kept: Value = serde_json::from_str(document.text()).unwrap();
                assert_eq!(&kept, sent);
                check_document(document.text(), Some(sent));
            }
        },
    );
}

/// Sends `bytes` plus a newline as one request; the answer line, parsed.
fn ask(socket: &Path, bytes: &[u8]) -> Response {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut line = bytes.to_vec();
    line.push(b'\n');
    stream.write_all(&line).unwrap();
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer:?}"))
}

#[test]
fn the_control_server_answers_garbage_with_a_clear_error_and_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("control.sock");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let listener = runtime.block_on(async { server::bind(&socket) }).unwrap();
    let echo = |request: Request| async move {
        Response::Done {
            message: format!("{request:?}"),
        }
    };
    // Console requests take the connection over; here they are simply closed.
    let attach = |_: server::Attached| async {};
    runtime.spawn(server::serve(listener, Arc::new(echo), Arc::new(attach)));

    // One line per request: bytes without a newline, which the framing would split.
    let garbage = prop::collection::vec(
        any::<u8>().prop_filter("no newline", |b| *b != b'\n'),
        0..256,
    );
    let seen = std::sync::Mutex::new(BTreeSet::new());
    run(
        "protocol: garbage through the server",
        CASES / 4,
        garbage,
        |bytes| match ask(&socket, &bytes) {
            Response::Done { .. } => {}
            Response::Error { message, .. } => {
                assert!(
                    message.starts_with("not a request this agent understands"),
                    "{message}"
                );
                seen.lock().unwrap().insert("error");
            }
            other => panic!("unexpected {other:?}"),
        },
    );
    run(
        "protocol: mutated requests through the server",
        CASES / 4,
        any_request(),
        |request| {
            let line = request.to_string();
            let decodes = serde_json::from_str::<Request>(&line).is_ok();
            match ask(&socket, line.as_bytes()) {
                Response::Done { .. } => assert!(decodes),
                Response::Error { .. } => assert!(!decodes),
                other => panic!("unexpected {other:?}"),
            }
        },
    );
    assert!(matches!(
        ask(&socket, br#"{"request":"status"}"#),
        Response::Done { .. }
    ));
    assert!(seen.lock().unwrap().contains("error"));
}
