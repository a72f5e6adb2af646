//! The `plasmavmc` client commands where no QEMU is needed: help texts, `validate`, exit code 3
//! with a clear message when the agent is not reachable, `plan` against "nothing running" when no
//! agent runs, and `--json` of the commands that answer with a message (a real agent without VMs).

#[path = "support/agent.rs"]
mod harness;
#[path = "support/qemu_harness.rs"]
mod qemu_harness;

use harness::{path_str, run, Host};
use serde_json::{json, Value};

fn write(dir: &tempfile::TempDir, name: &str, json: &Value) -> std::path::PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, json.to_string()).unwrap();
    path
}

fn web() -> Value {
    json!({
        "vcpus": 1, "memoryMiB": 128, "accel": "tcg", "kernel": "/boot/vmlinuz",
        "disks": {"data": {"path": "/var/lib/vms/web-data.qcow2", "format": "qcow2"}},
        "nics": {"eth0": {"mac": "52:54:00:12:34:56", "bridge": "br0"}},
    })
}

#[test]
fn help_explains_every_command_and_the_exit_codes() {
    let top = run(&["--help"]).expect_code(0, "--help");
    for command in [
        "agent", "validate", "plan", "reload", "status", "start", "stop", "reset",
    ] {
        assert!(
            top.stdout.contains(command),
            "--help lists {command}:\n{}",
            top.stdout
        );
        let help = run(&[command, "--help"]).expect_code(0, command);
        assert!(
            help.stdout.len() > 100,
            "{command} --help says something:\n{}",
            help.stdout
        );
    }
    assert!(
        top.stdout.contains("3"),
        "--help documents exit codes:\n{}",
        top.stdout
    );
    for client in ["plan", "reload", "status", "start", "stop", "reset"] {
        let help = run(&[client, "--help"]).stdout;
        assert!(
            help.contains("--run-dir"),
            "{client} takes --run-dir:\n{help}"
        );
    }
}

#[test]
fn validate_accepts_a_good_file_and_lists_every_problem_of_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(
        &dir,
        "good.json",
        &json!({"version": 1, "vms": {"web": web()}}),
    );
    run(&["validate", path_str(&good)]).expect_code(0, "valid file");

    let mut bad_vm = web();
    bad_vm["vcpus"] = json!(0);
    bad_vm["nics"]["eth0"]["mac"] = json!("01:00:5e:00:00:01");
    bad_vm["vcpuz"] = json!(2);
    let bad = write(
        &dir,
        "bad.json",
        &json!({"version": 1, "vms": {"web": bad_vm}}),
    );
    let out = run(&["validate", path_str(&bad)]).expect_code(2, "invalid file");
    assert!(
        out.stderr.contains("vms.web.vcpuz"),
        "unknown field named:\n{}",
        out.stderr
    );

    // Semantic problems are all reported together.
    let mut bad_vm = web();
    bad_vm["vcpus"] = json!(0);
    bad_vm["nics"]["eth0"]["mac"] = json!("01:00:5e:00:00:01");
    let bad = write(
        &dir,
        "bad2.json",
        &json!({"version": 1, "vms": {"web": bad_vm}}),
    );
    let out = run(&["validate", path_str(&bad)]).expect_code(2, "invalid file");
    assert!(out.stderr.contains("vms.web.vcpus"), "{}", out.stderr);
    assert!(
        out.stderr.contains("vms.web.nics.eth0.mac"),
        "{}",
        out.stderr
    );
    // The same, for scripts: exit 2 and every problem with its path.
    let out = run(&["validate", "--json", path_str(&bad)]).expect_code(2, "invalid, JSON");
    let report: Value = serde_json::from_str(&out.stdout).expect("validate --json is JSON");
    assert_eq!(report["valid"], false);
    let paths: Vec<&str> = report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["path"].as_str())
        .collect();
    assert!(
        paths.contains(&"vms.web.vcpus") && paths.contains(&"vms.web.nics.eth0.mac"),
        "{report}"
    );

    let missing = dir.path().join("missing.json");
    let out = run(&["validate", path_str(&missing)]).expect_code(2, "missing file");
    assert!(
        out.stderr.contains(path_str(&missing)),
        "names the file:\n{}",
        out.stderr
    );
}

#[test]
fn client_commands_without_an_agent_exit_3_and_say_where_they_looked() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = path_str(dir.path());
    for args in [
        vec!["status"],
        vec!["status", "--json"],
        vec!["reload", "--wait"],
        vec!["start", "web"],
        vec!["stop", "web"],
        vec!["reset", "web"],
    ] {
        let mut full = args.clone();
        full.extend(["--run-dir", run_dir]);
        let out = run(&full).expect_code(3, &args.join(" "));
        assert!(
            out.stderr.contains("not reachable") && out.stderr.contains("control.sock"),
            "{args:?} explains:\n{}",
            out.stderr
        );
    }
}

#[test]
fn plan_without_an_agent_plans_against_nothing_running_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        &dir,
        "desired.json",
        &json!({"version": 1, "vms": {"web": web()}}),
    );
    let run_dir = dir.path().join("run");
    let args = [
        "plan",
        "--config",
        path_str(&config),
        "--run-dir",
        path_str(&run_dir),
    ];
    let out = run(&args).expect_code(0, "plan without agent");
    assert!(out.stdout.contains("web"), "{}", out.stdout);
    assert!(
        out.stdout.contains("start"),
        "the VM would be started:\n{}",
        out.stdout
    );
    assert!(
        format!("{}{}", out.stdout, out.stderr).contains("agent"),
        "says that no agent runs:\n{}{}",
        out.stdout,
        out.stderr
    );

    let mut json_args = args.to_vec();
    json_args.push("--json");
    let out = run(&json_args).expect_code(0, "plan --json");
    let text = out.stdout;
    let start = text.find('{').expect("JSON on stdout");
    let plan: Value = serde_json::from_str(&text[start..]).expect("plan --json is JSON");
    let steps = plan["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 1, "{plan:#}");
    assert_eq!(steps[0]["vm"], "web");
    assert_eq!(steps[0]["action"]["kind"], "startVm");

    let bad = write(&dir, "bad.json", &json!({"version": 2, "vms": {}}));
    let out = run(&[
        "plan",
        "--config",
        path_str(&bad),
        "--run-dir",
        path_str(&run_dir),
    ])
    .expect_code(2, "plan of an invalid file");
    assert!(out.stderr.contains("version"), "{}", out.stderr);
}

/// `cordon`, `uncordon` and `shutdown-host` answer with a message: `--json` prints it as one
/// `{"message"}` object on stdout (`cordon`/`uncordon` add `cordoned` and `cluster`), with the
/// exit codes of the plain output.
#[test]
fn message_commands_print_json() {
    let mut host = Host::new();
    host.write_config(json!({}));
    host.start_agent();
    let message = |args: &[&str]| {
        let out = host.cli(args).expect_code(0, &args.join(" "));
        let answer: Value = serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: not one JSON object ({e}):\n{}", out.stdout));
        answer["message"]
            .as_str()
            .unwrap_or_else(|| panic!("{args:?}: no message: {answer}"))
            .to_owned()
    };
    let cordoned = message(&["cordon", "--json"]);
    assert!(cordoned.starts_with("host cordoned since"), "{cordoned}");
    assert_eq!(host.status()["cordon"]["by"], "cordon");
    let uncordoned = message(&["uncordon", "--json"]);
    assert!(uncordoned.starts_with("host uncordoned"), "{uncordoned}");
    let answer: Value =
        serde_json::from_str(&host.cli(&["cordon", "--json"]).stdout).expect("JSON");
    assert_eq!(
        (&answer["cordoned"], &answer["cluster"]),
        (&json!(true), &json!("standalone")),
        "{answer}"
    );
    message(&["uncordon", "--json"]);
    assert_eq!(
        message(&["uncordon", "--json"]),
        "the host was not cordoned"
    );
    let left_alone = message(&["shutdown-host", "--only-when-system-stops", "--json"]);
    assert!(left_alone.contains("not shutting down"), "{left_alone}");
    assert_eq!(
        message(&["shutdown-host", "--json"]),
        "host shutdown: no VM was running"
    );
    let refused = host.cli(&["migrate", "web", "--cancel", "--json"]);
    assert_ne!(refused.code, 0, "no such VM");
    assert!(
        refused.stdout.is_empty(),
        "errors go to stderr: {refused:?}"
    );
}

/// What the Nix package runs at install time (flake.nix `postInstall`): a completion script per
/// shell and a man page per command, from the binary itself.
#[test]
fn completions_and_man_pages_come_from_the_binary_as_the_package_installs_them() {
    for shell in ["bash", "zsh", "fish"] {
        let script = run(&["completions", shell]).expect_code(0, shell).stdout;
        for word in ["console", "shutdown-host", "--json"] {
            assert!(script.contains(word), "{shell} completions lack {word}");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    run(&["manpages", path_str(dir.path())]).expect_code(0, "manpages");
    let help = run(&["--help"]).expect_code(0, "--help").stdout;
    let commands = help
        .split("Commands:")
        .nth(1)
        .and_then(|rest| rest.split("Options:").next())
        .unwrap()
        .lines()
        .filter_map(|line| line.strip_prefix("  ")?.split_whitespace().next())
        .filter(|command| *command != "help")
        .collect::<Vec<_>>();
    assert!(commands.len() > 15, "{commands:?}");
    for command in commands {
        let page = dir.path().join(format!("plasmavmc-{command}.1"));
        assert!(page.exists(), "no man page for {command}");
    }
    assert!(dir.path().join("plasmavmc.1").exists());
    let flake = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../flake.nix"))
        .expect("flake.nix");
    for installs in [
        "plasmavmc completions bash",
        "plasmavmc completions zsh",
        "plasmavmc completions fish",
        "plasmavmc manpages man",
        "installManPage man/*.1",
    ] {
        assert!(
            flake.contains(installs),
            "the package no longer runs {installs:?}"
        );
    }
}
