//! Offline checks of the deployment files in `infra/`: no docker engine, compose or Nomad
//! runs here, so what can be known without them is checked against the real binary and
//! the sources.
//!
//! - every `sundara ...` command line in compose and Nomad files parses (the binary is run
//!   with the same arguments and `--help`: clap refuses an unknown flag or a bad value
//!   before it prints help), worker ids are valid, `--slice` values parse, and every
//!   `SUNDARA_*` / `OTEL_*` variable they set is one the binary reads;
//! - compose: images or builds (Dockerfile stages, build args), `depends_on` targets,
//!   volumes and bind mounts exist; the worker service scales; the compose-driven
//!   autoscaler acts on the worker service under ids it can map to containers;
//! - Nomad: each file parses as HCL, has its job and groups, and the autoscaler's job,
//!   group and pool prefix are those of the worker job;
//! - Prometheus, the OpenTelemetry collector and Grafana's provisioning agree with compose,
//!   and every metric the dashboard queries is documented in docs/operations.md;
//! - the Dockerfile has its stages, runs `sundara`, and pins what scripts/setup pins.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_yaml::Value as Yaml;

/// A worker's hostname in compose (docker sets it to the container's short id).
const HOSTNAME: &str = "0a1b2c3d4e5f";
/// `${NOMAD_ALLOC_ID}`: a full allocation id.
const ALLOC_ID: &str = "8d3c1f0e-5b7a-4c2d-9e6f-1a2b3c4d5e6f";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

// ------------------------------------------------------------------ the binary

fn sundara(args: &[String]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sundara"));
    cmd.args(args);
    // Values from this environment must not change what is parsed.
    for (k, _) in std::env::vars() {
        if k.starts_with("SUNDARA_") || k.starts_with("OTEL_") || k == "NOMAD_TOKEN" {
            cmd.env_remove(k);
        }
    }
    cmd.output().expect("running sundara")
}

fn help(path: &[&str]) -> String {
    let mut args: Vec<String> = path.iter().map(|s| s.to_string()).collect();
    args.push("--help".into());
    let out = sundara(&args);
    assert!(out.status.success(), "sundara {} --help failed: {}", path.join(" "), String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("help is UTF-8")
}

/// Subcommand names listed under `Commands:` in a help text.
fn subcommands(help: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in help.lines() {
        if line.trim_end() == "Commands:" {
            inside = true;
            continue;
        }
        if inside {
            if !line.starts_with("  ") {
                break;
            }
            if let Some(name) = line.split_whitespace().next()
                && name != "help"
            {
                out.push(name.to_string());
            }
        }
    }
    out
}

/// `NAME` of every `[env: NAME=...]` in a help text.
fn env_names(help: &str) -> BTreeSet<String> {
    help.split("[env: ")
        .skip(1)
        .map(|rest| rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect::<String>())
        .filter(|name| !name.is_empty())
        .collect()
}

/// Environment variables each (sub)command reads, by command path ("" for the top level;
/// global ones appear under every subcommand).
fn accepted_env() -> &'static BTreeMap<String, BTreeSet<String>> {
    static ENV: OnceLock<BTreeMap<String, BTreeSet<String>>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut out = BTreeMap::new();
        let mut queue = vec![Vec::<String>::new()];
        while let Some(path) = queue.pop() {
            let refs: Vec<&str> = path.iter().map(String::as_str).collect();
            let text = help(&refs);
            out.insert(path.join(" "), env_names(&text));
            for sub in subcommands(&text) {
                let mut p = path.clone();
                p.push(sub);
                queue.push(p);
            }
        }
        // Read outside clap, and never a flag (a flag's value shows in `ps`): the validator
        // secret, which their help names.
        for command in ["scheduler", "verifier"] {
            let secret = sundara_common::validator_key::SECRET_ENV;
            assert!(help(&[command]).contains(secret), "`sundara {command} --help` names {secret}");
            out.get_mut(command).expect("a subcommand").insert(secret.to_string());
        }
        out
    })
}

/// Read by the OpenTelemetry SDK in every process that exports traces, not by clap
/// (docs/operations.md, "Traces").
const SDK_ENV: [&str; 2] = ["OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG"];

fn all_accepted_env() -> BTreeSet<String> {
    accepted_env().values().flatten().cloned().chain(SDK_ENV.map(String::from)).collect()
}

fn value_of<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let eq = format!("{flag}=");
    args.iter().enumerate().find_map(
        |(i, a)| {
            if a == flag { args.get(i + 1).map(String::as_str) } else { a.strip_prefix(&eq) }
        },
    )
}

fn values_of<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
    args.iter()
        .enumerate()
        .filter(|(_, a)| *a == flag)
        .filter_map(|(i, _)| args.get(i + 1).map(String::as_str))
        .collect()
}

/// Checks one `sundara` command line (without the binary's name) as the binary would take
/// it, and what clap leaves to the code: worker ids, slices, the autoscaler's driver.
fn check_command(args: &[String]) -> Result<(), String> {
    let mut with_help = args.to_vec();
    with_help.push("--help".into());
    let out = sundara(&with_help);
    if !out.status.success() {
        return Err(format!(
            "`sundara {}` does not parse: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    match args.first().map(String::as_str) {
        Some("worker") => {
            let id = value_of(args, "--id").ok_or("worker without --id")?;
            if !sundara_schemas::subjects::is_token(id) {
                return Err(format!("worker id {id:?} is not 1-64 of [A-Za-z0-9_-]"));
            }
            for (i, slice) in values_of(args, "--slice").into_iter().enumerate() {
                sundara_worker::SliceConfig::parse(slice, i).map_err(|e| format!("--slice {slice:?}: {e}"))?;
            }
        }
        Some("autoscaler") => {
            if let Some(driver) = value_of(args, "--driver")
                && !["local", "nomad", "compose"].contains(&driver)
            {
                return Err(format!("unknown autoscaler driver {driver:?}"));
            }
            let num = |flag: &str, default: usize| -> Result<usize, String> {
                value_of(args, flag).map_or(Ok(default), |v| v.parse().map_err(|_| format!("{flag} {v:?}")))
            };
            if num("--min-workers", 1)? > num("--max-workers", 8)? {
                return Err("--min-workers > --max-workers".into());
            }
        }
        Some(_) => {}
        None => return Err("empty command".into()),
    }
    Ok(())
}

/// Variables set for `command` (a path like "worker" or "models push") that the binary
/// does not read.
fn unknown_env<'a>(command: &str, keys: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let accepted = accepted_env();
    let known = accepted.get(command).cloned().unwrap_or_else(|| accepted[""].clone());
    keys.into_iter()
        .filter(|k| k.starts_with("SUNDARA_") || k.starts_with("OTEL_") || *k == "NOMAD_TOKEN")
        .filter(|k| !known.contains(*k) && !SDK_ENV.contains(k))
        .map(String::from)
        .collect()
}

/// The subcommand path of a command line ("models push", "worker").
fn command_path(args: &[String]) -> String {
    let accepted = accepted_env();
    let mut path = String::new();
    for a in args {
        let next = if path.is_empty() { a.clone() } else { format!("{path} {a}") };
        if accepted.contains_key(&next) {
            path = next;
        } else {
            break;
        }
    }
    path
}

// ------------------------------------------------------------------ interpolation

/// Compose's interpolation with every variable unset: `$$` is `$`, `${X:-d}` is `d`,
/// a required `${X:?msg}` is `test-X`, `${X}` is empty. Ours because no well-kept Rust crate
/// implements Compose's own syntax (`$$`, `:-`, `:?`, `:+`), which shell expanders differ from.
fn compose_interpolate(s: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        match chars.peek() {
            Some('$') => {
                chars.next();
                out.push('$');
            }
            Some('{') => {
                chars.next();
                let mut body = String::new();
                let mut depth = 1;
                for c in chars.by_ref() {
                    match c {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                    body.push(c);
                }
                if depth != 0 {
                    return Err(format!("unterminated ${{ in {s:?}"));
                }
                let name_end = body.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(body.len());
                let (name, rest) = body.split_at(name_end);
                if name.is_empty() {
                    return Err(format!("bad interpolation ${{{body}}} in {s:?}"));
                }
                let value = if let Some(d) = rest.strip_prefix(":-").or_else(|| rest.strip_prefix('-')) {
                    compose_interpolate(d)?
                } else if rest.starts_with(":?") || rest.starts_with('?') {
                    format!("test-{name}")
                } else if rest.starts_with(":+") || rest.starts_with('+') || rest.is_empty() {
                    String::new()
                } else {
                    return Err(format!("bad interpolation ${{{body}}} in {s:?}"));
                };
                out.push_str(&value);
            }
            Some(c) if c.is_ascii_alphabetic() || *c == '_' => {
                // `$NAME`: unset.
                while chars.peek().is_some_and(|c| c.is_ascii_alphanumeric() || *c == '_') {
                    chars.next();
                }
            }
            _ => out.push('$'),
        }
    }
    Ok(out)
}

/// Splits a `/bin/sh -c` script into words: the variables and command substitutions in
/// `vars` are expanded first (any other `$` is an error; quotes do not stop it), then
/// `shlex` splits the words (quotes, backslashes). A script must be one command: `;`, `&`,
/// `|`, `<`, `>` or a backquote outside the expansions is an error, quoted or not.
fn shell_words(script: &str, vars: &HashMap<&str, &str>) -> Result<Vec<String>, String> {
    let single = |text: &str| {
        if text.contains([';', '&', '|', '<', '>', '`']) {
            Err(format!("not a single command: {script:?}"))
        } else {
            Ok(())
        }
    };
    let mut expanded = String::new();
    let mut rest = script;
    while let Some(i) = rest.find('$') {
        single(&rest[..i])?;
        expanded.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let enclosed = |open: char, close: char| {
            let body = after.strip_prefix(open)?;
            body.find(close).map(|end| (&body[..end], end + 2))
        };
        let (name, len) = if let Some((name, len)) = enclosed('{', '}') {
            (name.to_string(), len)
        } else if let Some((command, len)) = enclosed('(', ')') {
            (format!("$({})", command.trim()), len)
        } else {
            let len = after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(after.len());
            (after[..len].to_string(), len)
        };
        let value = vars.get(name.as_str()).ok_or_else(|| format!("unexpected ${name} in {script:?}"))?;
        expanded.push_str(value);
        rest = &after[len..];
    }
    single(rest)?;
    expanded.push_str(rest);
    shlex::split(&expanded).ok_or_else(|| format!("unterminated quote or escape in {script:?}"))
}

/// The `sundara` arguments of a shell script `exec sundara ...`.
fn sundara_args_of_script(script: &str, vars: &HashMap<&str, &str>) -> Result<Vec<String>, String> {
    let mut words = shell_words(script, vars)?;
    if words.first().map(String::as_str) == Some("exec") {
        words.remove(0);
    }
    match words.first().map(String::as_str) {
        Some("sundara" | "/usr/local/bin/sundara") => Ok(words.split_off(1)),
        _ => Err(format!("the script does not run sundara: {script:?}")),
    }
}

// ------------------------------------------------------------------ compose

/// Variables compose.yaml requires (`${NAME:?message}`).
fn compose_required_vars() -> BTreeSet<String> {
    let text = read("infra/compose.yaml");
    text.match_indices("${")
        .filter(|(i, _)| !text[..*i].ends_with('$'))
        .filter_map(|(i, _)| {
            let rest = &text[i + 2..];
            let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            (rest[name.len()..].starts_with(":?") || rest[name.len()..].starts_with('?')).then_some(name)
        })
        .collect()
}

fn compose() -> Yaml {
    let mut doc: Yaml = serde_yaml::from_str(&read("infra/compose.yaml")).expect("infra/compose.yaml is YAML");
    doc.apply_merge().expect("merge keys");
    doc
}

fn strings(v: &Yaml, what: &str) -> Vec<String> {
    match v {
        Yaml::Sequence(items) => items
            .iter()
            .map(|i| match i {
                Yaml::String(s) => s.clone(),
                Yaml::Number(n) => n.to_string(),
                other => panic!("{what}: not a string: {other:?}"),
            })
            .collect(),
        Yaml::String(s) => s.split_whitespace().map(String::from).collect(),
        other => panic!("{what}: not a list of strings: {other:?}"),
    }
}

fn env_map(service: &Yaml) -> BTreeMap<String, String> {
    match &service["environment"] {
        Yaml::Null => BTreeMap::new(),
        Yaml::Mapping(m) => m
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Yaml::String(s) => s.clone(),
                    Yaml::Number(n) => n.to_string(),
                    Yaml::Bool(b) => b.to_string(),
                    Yaml::Null => String::new(),
                    other => panic!("environment value {other:?}"),
                };
                (k.as_str().expect("env key").to_string(), v)
            })
            .collect(),
        Yaml::Sequence(items) => items
            .iter()
            .map(|i| {
                let s = i.as_str().expect("env entry");
                let (k, v) = s.split_once('=').unwrap_or((s, ""));
                (k.to_string(), v.to_string())
            })
            .collect(),
        other => panic!("environment {other:?}"),
    }
}

struct Stage {
    name: String,
    /// The `FROM` image: an image reference or the name of another stage.
    from: String,
    /// The stage's instructions after `FROM`, each as written (continuation lines included).
    body: Vec<String>,
}

/// The Dockerfile's stages and its ARGs (global and per stage) with their defaults.
fn dockerfile() -> (Vec<Stage>, BTreeMap<String, String>) {
    let parsed = dockerfile_parser::Dockerfile::parse(&read("infra/Dockerfile")).expect("infra/Dockerfile parses");
    let text = |i: &&dockerfile_parser::Instruction| parsed.content[i.span().start..i.span().end].trim().to_string();
    let args = (parsed.instructions.iter().filter_map(|i| i.as_arg()))
        .map(|a| (a.name.content.clone(), a.value.as_ref().map(|v| v.content.clone()).unwrap_or_default()))
        .collect();
    let stages = (parsed.iter_stages())
        .map(|s| {
            let from = s.instructions[0].as_from().expect("a stage starts with FROM");
            Stage {
                name: from.alias.as_ref().map(|a| a.content.clone()).unwrap_or_default(),
                from: from.image.content.clone(),
                body: s.instructions[1..].iter().map(text).collect(),
            }
        })
        .collect();
    (stages, args)
}

#[test]
fn compose_services_images_and_dependencies_exist() {
    let doc = compose();
    assert!(doc.get("version").is_none(), "the Compose Specification has no `version:`");
    let services = doc["services"].as_mapping().expect("services");
    let names: BTreeSet<String> = services.keys().map(|k| k.as_str().unwrap().to_string()).collect();
    let volumes: BTreeSet<String> = doc["volumes"]
        .as_mapping()
        .map(|m| m.keys().map(|k| k.as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    let (stages, dockerfile_args) = dockerfile();
    let stage_names: BTreeSet<&str> = stages.iter().map(|s| s.name.as_str()).collect();
    let infra = root().join("infra");
    for required in [
        "nats",
        "redis",
        "otel-collector",
        "jaeger",
        "prometheus",
        "grafana",
        "models",
        "ingress",
        "scheduler",
        "verifier",
        "rewarder",
        "jobs",
        "autoscaler",
        "worker",
    ] {
        assert!(names.contains(required), "compose has no service {required}");
    }
    let mut problems = Vec::new();
    for (name, svc) in services {
        let name = name.as_str().unwrap();
        let image = svc["image"].as_str().map(compose_interpolate).transpose().unwrap().unwrap_or_default();
        if image.is_empty() && svc.get("build").is_none() {
            problems.push(format!("{name}: neither image nor build"));
        }
        if !image.is_empty() && (image.contains(char::is_whitespace) || image.ends_with(':')) {
            problems.push(format!("{name}: bad image {image:?}"));
        }
        if let Some(build) = svc.get("build") {
            let context = infra.join(build["context"].as_str().unwrap_or("."));
            let dockerfile = context.join(build["dockerfile"].as_str().unwrap_or("Dockerfile"));
            if !dockerfile.is_file() {
                problems.push(format!("{name}: no Dockerfile at {}", dockerfile.display()));
            }
            if dockerfile.canonicalize().ok() != root().join("infra/Dockerfile").canonicalize().ok() {
                problems.push(format!("{name}: builds from another Dockerfile"));
            }
            if let Some(target) = build["target"].as_str()
                && !stage_names.contains(target)
            {
                problems.push(format!("{name}: build target {target} is not a stage of infra/Dockerfile"));
            }
            if let Some(args) = build["args"].as_mapping() {
                for (k, v) in args {
                    let k = k.as_str().unwrap();
                    if !dockerfile_args.contains_key(k) {
                        problems.push(format!("{name}: build arg {k} is not an ARG of infra/Dockerfile"));
                    }
                    if k == "CARGO_FEATURES" {
                        for feature in v.as_str().unwrap().split([',', ' ']).filter(|f| !f.is_empty()) {
                            let (krate, feat) = feature.split_once('/').expect("crate/feature");
                            let manifest = match krate {
                                "sundara-runtime" => "services/runtime/Cargo.toml",
                                other => panic!("{name}: feature of unexpected crate {other}"),
                            };
                            let toml = read(manifest);
                            assert!(
                                toml.lines().any(|l| l.trim_start().starts_with(&format!("{feat} ="))),
                                "{manifest} has no feature {feat}"
                            );
                        }
                    }
                }
            }
        }
        match &svc["depends_on"] {
            Yaml::Null => {}
            Yaml::Sequence(deps) => {
                for d in deps {
                    let d = d.as_str().unwrap();
                    if !names.contains(d) {
                        problems.push(format!("{name}: depends on unknown service {d}"));
                    }
                }
            }
            Yaml::Mapping(deps) => {
                for (d, cond) in deps {
                    let d = d.as_str().unwrap();
                    if !names.contains(d) {
                        problems.push(format!("{name}: depends on unknown service {d}"));
                        continue;
                    }
                    let condition = cond["condition"].as_str().unwrap_or("service_started");
                    let dep = &services[d];
                    match condition {
                        "service_healthy"
                            if dep["healthcheck"].is_null() || dep["healthcheck"]["disable"] == Yaml::Bool(true) =>
                        {
                            problems.push(format!("{name}: waits for {d} to be healthy, which has no healthcheck"))
                        }
                        "service_completed_successfully" if dep["restart"].as_str() != Some("no") => {
                            problems.push(format!("{name}: waits for {d} to complete, which restarts"))
                        }
                        "service_healthy" | "service_completed_successfully" | "service_started" => {}
                        other => problems.push(format!("{name}: unknown depends_on condition {other}")),
                    }
                }
            }
            other => problems.push(format!("{name}: depends_on {other:?}")),
        }
        for v in svc["volumes"].as_sequence().into_iter().flatten() {
            let spec = compose_interpolate(v.as_str().expect("short volume syntax")).unwrap();
            let source = spec.split(':').next().unwrap();
            if source.starts_with('.') {
                if !infra.join(source).exists() {
                    problems.push(format!("{name}: bind mount source {source} does not exist under infra/"));
                }
            } else if !source.starts_with('/') && !source.starts_with("~/") && !volumes.contains(source) {
                problems.push(format!("{name}: volume {source} is not declared"));
            }
        }
    }
    assert!(problems.is_empty(), "infra/compose.yaml:\n  {}", problems.join("\n  "));
}

/// Each service of the `sundara` image, its `sundara` arguments and environment.
fn compose_sundara_commands() -> Vec<(String, Vec<String>, BTreeMap<String, String>)> {
    compose_sundara_commands_of(&compose())
}

/// As [`compose_sundara_commands`], of `doc` (a changed copy of compose.yaml).
fn compose_sundara_commands_of(doc: &Yaml) -> Vec<(String, Vec<String>, BTreeMap<String, String>)> {
    let vars = HashMap::from([("HOSTNAME", HOSTNAME), ("$(hostname)", HOSTNAME), ("$(cat /etc/hostname)", HOSTNAME)]);
    let mut out = Vec::new();
    for (name, svc) in doc["services"].as_mapping().unwrap() {
        let name = name.as_str().unwrap().to_string();
        let image = svc["image"].as_str().unwrap_or("");
        // The keys' one-shot runs a script (checked by running it: compose_stack_is_secured).
        if !image.starts_with("sundara") || name == SECRETS_SERVICE {
            continue;
        }
        let command: Vec<String> = strings(&svc["command"], &name)
            .iter()
            .map(|s| compose_interpolate(s).unwrap_or_else(|e| panic!("{name}: {e}")))
            .collect();
        let args = match &svc["entrypoint"] {
            // The image's ENTRYPOINT is `sundara`.
            Yaml::Null => command,
            entrypoint => {
                let entrypoint = strings(entrypoint, &name);
                assert_eq!(entrypoint, ["/bin/sh", "-c"], "{name}: entrypoint");
                assert_eq!(command.len(), 1, "{name}: `sh -c` takes one script");
                sundara_args_of_script(&command[0], &vars).unwrap_or_else(|e| panic!("{name}: {e}"))
            }
        };
        let env = env_map(svc)
            .into_iter()
            .map(|(k, v)| (k, compose_interpolate(&v).unwrap_or_else(|e| panic!("{name}: {e}"))))
            .collect();
        out.push((name, args, env));
    }
    out
}

#[test]
fn compose_commands_parse_and_set_only_known_variables() {
    let commands = compose_sundara_commands();
    assert!(commands.len() >= 7, "sundara services in compose: {}", commands.len());
    let required = compose_required_vars();
    assert!(required.contains("REDIS_PASSWORD"), "compose must refuse to start without REDIS_PASSWORD");
    let mut problems = Vec::new();
    for (name, args, env) in &commands {
        if let Err(e) = check_command(args) {
            problems.push(format!("{name}: {e}"));
        }
        // A compose-driven autoscaler runs `docker compose` on this file, which refuses to
        // load without the variables the file requires: those are for its compose.
        let compose_driven = value_of(args, "--driver") == Some("compose");
        if compose_driven {
            for var in &required {
                if !env.contains_key(var) {
                    problems.push(format!("{name}: its docker compose needs {var}"));
                }
            }
        }
        let keys = env.keys().map(String::as_str).filter(|k| !(compose_driven && required.contains(*k)));
        let unknown = unknown_env(&command_path(args), keys);
        if !unknown.is_empty() {
            problems.push(format!("{name}: `sundara {}` reads no {unknown:?}", command_path(args)));
        }
        for key in ["SUNDARA_NATS_URL", "SUNDARA_REDIS_URL"] {
            // Redis goes only to the commands that use it (not miners, not the verifier).
            let wanted = unknown_env(&command_path(args), [key]).is_empty();
            if env.contains_key(key) != wanted {
                problems.push(format!("{name}: {} {key}", if wanted { "no" } else { "needlessly given" }));
            }
        }
        if ["scheduler", "verifier"].contains(&args[0].as_str())
            && !env.contains_key("SUNDARA_SECRET")
            && !env.contains_key("SUNDARA_SECRET_FILE")
        {
            problems.push(format!("{name}: no SUNDARA_SECRET_FILE (or SUNDARA_SECRET)"));
        }
    }
    assert!(problems.is_empty(), "infra/compose.yaml:\n  {}", problems.join("\n  "));
    // Every service runs, once; the demo model is pushed by a one-shot.
    let services: BTreeSet<&str> = commands.iter().map(|(_, a, _)| a[0].as_str()).collect();
    for s in ["ingress", "scheduler", "verifier", "rewarder", "autoscaler", "worker", "models"] {
        assert!(services.contains(s), "no compose service runs `sundara {s}`");
    }
    let (_, push, _) = commands.iter().find(|(n, _, _)| n == "models").expect("models service");
    assert_eq!(push.join(" "), "models push /opt/sundara/models/mlp.onnx --name mlp --redundancy 2");
}

#[test]
fn compose_worker_pool_matches_the_compose_driver() {
    let doc = compose();
    let services = &doc["services"];
    let worker = &services["worker"];
    assert!(worker["container_name"].is_null(), "a scaled service cannot have a container_name");
    assert!(worker["ports"].is_null(), "a scaled service cannot bind fixed host ports");
    assert!(worker["hostname"].is_null(), "worker ids are the containers' own hostnames");
    let commands = compose_sundara_commands();
    let args_of = |service: &str| commands.iter().find(|(n, _, _)| n == service).map(|(_, a, _)| a.clone());
    let worker_args = args_of("worker").expect("worker");
    // The compose driver replaces a worker with `docker rm -f <worker id without the
    // prefix>`: what follows the prefix must be the container's hostname (its short id).
    let scaler = args_of("autoscaler-compose").expect("autoscaler-compose service");
    let prefix = value_of(&scaler, "--pool-prefix").expect("--pool-prefix");
    assert!(!prefix.is_empty(), "an empty prefix would make every worker in Redis the pool's");
    let pool_id = format!("{prefix}{HOSTNAME}");
    assert_eq!(value_of(&worker_args, "--id"), Some(pool_id.as_str()), "worker id must be the prefix and the hostname");
    if let Some(gpu) = args_of("worker-gpu") {
        assert_eq!(value_of(&gpu, "--id"), Some(pool_id.as_str()));
    }
    let mut driver = sundara_autoscaler::driver::ComposeDriver::new("infra/compose.yaml".into(), "worker");
    driver.prefix = prefix.to_string();
    assert_eq!(driver.remove_args(&pool_id), Some(vec!["rm".into(), "-f".into(), HOSTNAME.to_string()]));

    assert_eq!(value_of(&scaler, "--driver"), Some("compose"));
    assert_eq!(value_of(&scaler, "--compose-service"), Some("worker"));
    assert_eq!(
        value_of(&scaler, "--worker-threads"),
        value_of(&worker_args, "--threads"),
        "autoscaler's lanes per worker"
    );
    let file = value_of(&scaler, "--compose-file").expect("--compose-file");
    let svc = &services["autoscaler-compose"];
    assert!(svc["profiles"].as_sequence().is_some_and(|p| !p.is_empty()), "the docker-socket autoscaler is opt-in");
    let mounts: Vec<String> = strings(&svc["volumes"], "volumes");
    assert!(mounts.iter().any(|m| m.starts_with("/var/run/docker.sock:")), "it needs the docker socket");
    let mounted = mounts.iter().any(|m| {
        let mut parts = m.split(':');
        let (src, dst) = (parts.next().unwrap(), parts.next().unwrap_or(""));
        Path::new(file)
            .strip_prefix(dst)
            .is_ok_and(|rel| root().join("infra").join(src).join(rel) == root().join("infra/compose.yaml"))
    });
    assert!(mounted, "--compose-file {file} is not this compose file mounted into the container");
    assert_eq!(
        doc["name"].as_str(),
        Some("sundara"),
        "a fixed project name, so the in-container compose acts on this project"
    );
    assert_eq!(env_map(svc).get("COMPOSE_PROJECT_NAME").map(String::as_str), Some("sundara"));
    let build = &svc["build"];
    assert_eq!(build["target"].as_str(), Some("operator"), "the docker CLI is in the operator image");
    // The default autoscaler watches health only.
    assert_eq!(args_of("autoscaler").expect("autoscaler"), ["autoscaler"]);
}

#[test]
fn compose_file_default_of_the_autoscaler_is_this_file() {
    let text = help(&["autoscaler"]);
    assert!(text.contains("[default: infra/compose.yaml]"), "sundara autoscaler --help:\n{text}");
    assert!(root().join("infra/compose.yaml").is_file());
}

// ------------------------------------------------------------------ Nomad

fn hcl_str(v: &hcl::Value) -> Result<String, String> {
    match v {
        hcl::Value::String(s) => Ok(s.clone()),
        hcl::Value::Number(n) => Ok(n.to_string()),
        hcl::Value::Bool(b) => Ok(b.to_string()),
        other => Err(format!("not a string: {other:?}")),
    }
}

fn attr<'a>(body: &'a hcl::Body, key: &str) -> Option<&'a hcl::Expression> {
    body.attributes().find(|a| a.key() == key).map(|a| a.expr())
}

fn blocks<'a>(body: &'a hcl::Body, ident: &'a str) -> impl Iterator<Item = &'a hcl::Block> + 'a {
    body.blocks().filter(move |b| b.identifier() == ident)
}

fn label(b: &hcl::Block) -> &str {
    b.labels().first().map(|l| l.as_str()).unwrap_or("")
}

/// A Nomad job file: its variables (defaults), evaluated with `overrides`, its locals, and
/// the run-time names Nomad interpolates when it places a task.
struct NomadFile {
    body: hcl::Body,
    ctx: hcl::eval::Context<'static>,
    defaults: BTreeMap<String, hcl::Value>,
}

fn nomad_file(rel: &str, set_empty_strings: bool) -> NomadFile {
    nomad_file_of(rel, &read(rel), set_empty_strings)
}

/// As [`nomad_file`], of `text` (a changed copy of the file `rel`).
fn nomad_file_of(rel: &str, text: &str, set_empty_strings: bool) -> NomadFile {
    use hcl::eval::Evaluate;
    let body = hcl::parse(text).unwrap_or_else(|e| panic!("{rel} is not HCL: {e}"));
    let mut defaults = BTreeMap::new();
    for v in blocks(&body, "variable") {
        let default =
            attr(v.body(), "default").unwrap_or_else(|| panic!("{rel}: variable {} has no default", label(v)));
        let value = default
            .evaluate(&hcl::eval::Context::new())
            .unwrap_or_else(|e| panic!("{rel}: variable {}: {e}", label(v)));
        defaults.insert(label(v).to_string(), value);
    }
    let mut vars = hcl::Map::new();
    for (k, v) in &defaults {
        let v = match v {
            hcl::Value::String(s) if s.is_empty() && set_empty_strings => hcl::Value::String(format!("set-{k}")),
            v => v.clone(),
        };
        vars.insert(k.clone(), v);
    }
    let mut ctx = hcl::eval::Context::new();
    ctx.declare_var("var", hcl::Value::Object(vars));
    ctx.declare_var("NOMAD_ALLOC_ID", ALLOC_ID);
    let mut network = hcl::Map::new();
    network.insert("ip-address".to_string(), hcl::Value::from("10.0.0.7"));
    let mut unique = hcl::Map::new();
    unique.insert("network".to_string(), hcl::Value::Object(network));
    let mut attrs = hcl::Map::new();
    attrs.insert("unique".to_string(), hcl::Value::Object(unique));
    ctx.declare_var("attr", hcl::Value::Object(attrs));
    // Locals may refer to each other: evaluate until none is left (as Nomad does).
    let mut pending: Vec<(String, hcl::Expression)> = blocks(&body, "locals")
        .flat_map(|b| b.body().attributes().map(|a| (a.key().to_string(), a.expr().clone())))
        .collect();
    let mut locals = hcl::Map::new();
    while !pending.is_empty() {
        let before = pending.len();
        let mut last_err = String::new();
        pending.retain(|(k, e)| {
            let mut c = ctx.clone();
            c.declare_var("local", hcl::Value::Object(locals.clone()));
            match e.evaluate(&c) {
                Ok(v) => {
                    locals.insert(k.clone(), v);
                    false
                }
                Err(err) => {
                    last_err = format!("local.{k}: {err}");
                    true
                }
            }
        });
        assert!(pending.len() < before, "{rel}: {last_err}");
    }
    ctx.declare_var("local", hcl::Value::Object(locals));
    NomadFile { body, ctx, defaults }
}

impl NomadFile {
    fn eval(&self, e: &hcl::Expression) -> Result<hcl::Value, String> {
        use hcl::eval::Evaluate;
        e.evaluate(&self.ctx).map_err(|e| e.to_string())
    }

    fn job(&self) -> &hcl::Block {
        let jobs: Vec<_> = blocks(&self.body, "job").collect();
        assert_eq!(jobs.len(), 1, "one job per file");
        jobs[0]
    }

    fn groups(&self) -> Vec<&hcl::Block> {
        blocks(self.job().body(), "group").collect()
    }
}

struct NomadTask {
    group: String,
    task: String,
    image: String,
    args: Vec<String>,
    env: BTreeSet<String>,
    /// Values of the `env` blocks.
    env_values: BTreeMap<String, String>,
    templates: Vec<NomadTemplate>,
}

/// A task's `template` block, evaluated.
struct NomadTemplate {
    data: String,
    destination: String,
    env: bool,
    perms: Option<String>,
    uid: Option<u64>,
}

/// `KEY` of every `KEY=` in an env template (Go template text around them is ignored).
fn template_env_keys(data: &str) -> BTreeSet<String> {
    let bytes = data.as_bytes();
    let mut keys = BTreeSet::new();
    for (i, _) in data.match_indices('=') {
        let start = bytes[..i]
            .iter()
            .rposition(|c| !(c.is_ascii_uppercase() || c.is_ascii_digit() || *c == b'_'))
            .map_or(0, |p| p + 1);
        if start < i && bytes[start].is_ascii_uppercase() {
            keys.insert(data[start..i].to_string());
        }
    }
    keys
}

fn nomad_tasks(f: &NomadFile) -> Result<Vec<NomadTask>, String> {
    let mut out = Vec::new();
    for group in f.groups() {
        for task in blocks(group.body(), "task") {
            let at = format!("group {} task {}", label(group), label(task));
            let driver =
                attr(task.body(), "driver").map(|e| f.eval(e)).transpose()?.map(|v| hcl_str(&v)).transpose()?;
            if driver.as_deref() != Some("docker") {
                return Err(format!("{at}: driver {driver:?}, expected docker"));
            }
            let config = blocks(task.body(), "config").next().ok_or(format!("{at}: no config"))?;
            let image = hcl_str(&f.eval(attr(config.body(), "image").ok_or(format!("{at}: no image"))?)?)?;
            let args = match attr(config.body(), "args") {
                Some(e) => match f.eval(e).map_err(|e| format!("{at}: args: {e}"))? {
                    hcl::Value::Array(items) => items.iter().map(hcl_str).collect::<Result<Vec<_>, _>>()?,
                    other => return Err(format!("{at}: args {other:?}")),
                },
                None => Vec::new(),
            };
            let mut env = BTreeSet::new();
            let mut env_values = BTreeMap::new();
            for e in blocks(task.body(), "env") {
                for a in e.body().attributes() {
                    env.insert(a.key().to_string());
                    env_values.insert(a.key().to_string(), hcl_str(&f.eval(a.expr())?)?);
                }
            }
            let mut templates = Vec::new();
            for t in blocks(task.body(), "template") {
                let get = |key: &str| attr(t.body(), key).map(|e| f.eval(e)).transpose();
                let is_env = get("env")?.is_some_and(|v| v == hcl::Value::Bool(true));
                let data = hcl_str(&get("data")?.ok_or(format!("{at}: template without data"))?)?;
                if is_env {
                    env.extend(template_env_keys(&data));
                }
                templates.push(NomadTemplate {
                    data,
                    destination: hcl_str(&get("destination")?.ok_or(format!("{at}: template without destination"))?)?,
                    env: is_env,
                    perms: get("perms")?.map(|v| hcl_str(&v)).transpose()?,
                    uid: get("uid")?.and_then(|v| v.as_u64()),
                });
            }
            out.push(NomadTask {
                group: label(group).into(),
                task: label(task).into(),
                image,
                args,
                env,
                env_values,
                templates,
            });
        }
    }
    Ok(out)
}

const NOMAD_FILES: [&str; 3] = [
    "infra/nomad/sundara-infra.nomad.hcl",
    "infra/nomad/sundara-validator.nomad.hcl",
    "infra/nomad/sundara-workers.nomad.hcl",
];

#[test]
fn nomad_jobs_parse_and_their_commands_run() {
    let expected: [(&str, &[&str]); 3] = [
        ("sundara-infra", &["nats", "redis"]),
        ("sundara-validator", &["ingress", "scheduler", "verifier", "rewarder", "jobs", "autoscaler", "chain"]),
        ("sundara-workers", &["worker", "gpu-worker"]),
    ];
    let mut problems = Vec::new();
    for (rel, (job, groups)) in NOMAD_FILES.iter().zip(expected) {
        // Once with the defaults, once with every optional address set.
        for set in [false, true] {
            let f = nomad_file(rel, set);
            assert_eq!(label(f.job()), job, "{rel}");
            let found: Vec<&str> = f.groups().iter().map(|g| label(g)).collect();
            assert_eq!(found, groups, "{rel}: groups");
            let tasks = nomad_tasks(&f).unwrap_or_else(|e| panic!("{rel}: {e}"));
            for t in &tasks {
                let at = format!(
                    "{rel} ({}) group {} task {}",
                    if set { "variables set" } else { "defaults" },
                    t.group,
                    t.task
                );
                if !t.image.starts_with("sundara") {
                    continue;
                }
                if let Err(e) = check_command(&t.args) {
                    problems.push(format!("{at}: {e}"));
                }
                let unknown = unknown_env(&command_path(&t.args), t.env.iter().map(String::as_str));
                if !unknown.is_empty() {
                    problems.push(format!("{at}: `sundara {}` reads no {unknown:?}", command_path(&t.args)));
                }
                for key in ["SUNDARA_NATS_URL", "SUNDARA_REDIS_URL", "SUNDARA_METRICS_ADDR"] {
                    // Miners reach only NATS (their reports go through the fleet gateway), and
                    // the verifier needs no Redis either: each gets what its command reads.
                    let wanted = unknown_env(&command_path(&t.args), [key]).is_empty();
                    if t.env.contains(key) != wanted {
                        problems.push(format!("{at}: {} {key}", if wanted { "no" } else { "a miner must not get" }));
                    }
                }
                if set && !t.env.contains("OTEL_EXPORTER_OTLP_ENDPOINT") {
                    problems.push(format!("{at}: otlp_endpoint set but no OTEL_EXPORTER_OTLP_ENDPOINT"));
                }
                if ["scheduler", "verifier"].contains(&t.args[0].as_str())
                    && !t.env.contains("SUNDARA_SECRET")
                    && !t.env.contains("SUNDARA_SECRET_FILE")
                {
                    problems.push(format!("{at}: no SUNDARA_SECRET_FILE (or SUNDARA_SECRET)"));
                }
                if t.args[0] == "autoscaler" && !t.env.contains("NOMAD_TOKEN") {
                    problems.push(format!("{at}: no NOMAD_TOKEN"));
                }
            }
        }
    }
    assert!(problems.is_empty(), "Nomad jobs:\n  {}", problems.join("\n  "));
}

#[test]
fn nomad_autoscaler_sizes_the_worker_job() {
    let validator = nomad_file(NOMAD_FILES[1], false);
    let workers = nomad_file(NOMAD_FILES[2], false);
    let tasks = nomad_tasks(&validator).unwrap();
    let scaler = &tasks.iter().find(|t| t.task == "autoscaler").expect("autoscaler task").args;
    assert_eq!(value_of(scaler, "--driver"), Some("nomad"));
    // The binary's defaults, so that a bare `sundara autoscaler --driver nomad` agrees too.
    let text = help(&["autoscaler"]);
    assert!(text.contains("[default: sundara-workers]") && text.contains("[default: worker]"), "{text}");
    let job = value_of(scaler, "--nomad-job").unwrap();
    let group = value_of(scaler, "--nomad-group").unwrap();
    assert_eq!((job, group), ("sundara-workers", "worker"));
    assert_eq!(label(workers.job()), job, "the autoscaler scales the worker job");
    let worker_group = workers.groups().into_iter().find(|g| label(g) == group).expect("the scaled group");
    // Replacing a worker stops allocation `<id without the prefix>`.
    let prefix = value_of(scaler, "--pool-prefix").expect("--pool-prefix");
    let worker_tasks = nomad_tasks(&workers).unwrap();
    for t in &worker_tasks {
        let id = value_of(&t.args, "--id").expect("worker --id");
        assert_eq!(
            id.strip_prefix(prefix),
            Some(ALLOC_ID),
            "group {}: worker id {id:?} must be {prefix:?} + the allocation id",
            t.group
        );
    }
    let cpu = worker_tasks.iter().find(|t| t.group == group).unwrap();
    assert_eq!(
        value_of(scaler, "--worker-threads"),
        value_of(&cpu.args, "--threads"),
        "the autoscaler's lanes per worker"
    );
    // The group's scaling bounds admit what the autoscaler asks for.
    let scaling = blocks(worker_group.body(), "scaling").next().expect("scaling block");
    let num = |f: &NomadFile, e: &hcl::Expression| f.eval(e).unwrap().as_u64().expect("a number");
    let max = num(&workers, attr(scaling.body(), "max").unwrap());
    let min = num(&workers, attr(scaling.body(), "min").unwrap());
    let want_max: u64 = value_of(scaler, "--max-workers").unwrap().parse().unwrap();
    let want_min: u64 = value_of(scaler, "--min-workers").unwrap().parse().unwrap();
    assert!(min <= want_min && want_max <= max, "scaling [{min}, {max}] vs autoscaler [{want_min}, {want_max}]");
    // GPU workers ask Nomad for a GPU and run a CUDA slice on the device it exposes.
    let gpu_group = workers.groups().into_iter().find(|g| label(g) == "gpu-worker").unwrap();
    let task = blocks(gpu_group.body(), "task").next().unwrap();
    let resources = blocks(task.body(), "resources").next().expect("resources");
    let device = blocks(resources.body(), "device").next().expect("device block");
    assert_eq!(label(device), "nvidia/gpu");
    assert_eq!(num(&workers, attr(device.body(), "count").unwrap()), 1);
    let gpu = worker_tasks.iter().find(|t| t.group == "gpu-worker").unwrap();
    assert!(value_of(&gpu.args, "--slice").is_some_and(|s| s.starts_with("cuda:0,")), "{:?}", gpu.args);
    assert!(workers.defaults.contains_key("gpu_image"));
}

#[test]
fn nomad_services_expose_metrics_and_find_the_stores() {
    let infra = nomad_file(NOMAD_FILES[0], false);
    let mut registered = BTreeSet::new();
    for g in infra.groups() {
        for s in blocks(g.body(), "service") {
            registered.insert(hcl_str(&infra.eval(attr(s.body(), "name").unwrap()).unwrap()).unwrap());
        }
    }
    // nats: JetStream on a volume.
    let nats = infra.groups().into_iter().find(|g| label(g) == "nats").unwrap();
    let task = blocks(nats.body(), "task").next().unwrap();
    let config = blocks(task.body(), "config").next().unwrap();
    let args = infra.eval(attr(config.body(), "args").unwrap()).unwrap();
    let args: Vec<String> = match args {
        hcl::Value::Array(a) => a.iter().map(|v| hcl_str(v).unwrap()).collect(),
        _ => panic!(),
    };
    assert!(args.contains(&"-js".to_string()) && value_of(&args, "-sd") == Some("/data"), "{args:?}");
    assert!(blocks(task.body(), "volume_mount").any(|m| {
        attr(m.body(), "destination").is_some_and(|d| infra.eval(d).ok() == Some(hcl::Value::from("/data")))
    }));
    for rel in &NOMAD_FILES[1..] {
        let f = nomad_file(rel, false);
        for g in f.groups() {
            let metrics_port =
                blocks(g.body(), "network").flat_map(|n| blocks(n.body(), "port")).find(|p| label(p) == "metrics");
            let port = metrics_port.unwrap_or_else(|| panic!("{rel}: group {} has no metrics port", label(g)));
            assert_eq!(infra_num(&f, attr(port.body(), "to").unwrap()), 9464);
            assert!(
                blocks(g.body(), "service")
                    .any(|s| attr(s.body(), "port").is_some_and(|p| f.eval(p).ok() == Some("metrics".into()))),
                "{rel}: group {} registers no service on its metrics port",
                label(g)
            );
        }
        let text = read(rel);
        for service in ["sundara-nats", "sundara-redis"] {
            assert!(registered.contains(service), "sundara-infra registers no {service}");
            let miners = rel.contains("workers");
            let wanted = service == "sundara-nats" || !miners;
            let looks_up = text.contains(&format!("nomadService \\\"{service}\\\""));
            assert_eq!(looks_up, wanted, "{rel} looks up {service}: {looks_up}");
        }
    }
}

#[test]
fn nomad_token_policy_allows_what_the_driver_calls() {
    use hcl::eval::Evaluate;
    let rel = "infra/nomad/sundara-autoscaler.policy.hcl";
    let body = hcl::parse(&read(rel)).unwrap_or_else(|e| panic!("{rel} is not HCL: {e}"));
    let ns: Vec<_> = blocks(&body, "namespace").collect();
    // The driver's requests carry no namespace parameter: Nomad takes them as `default`.
    assert_eq!(ns.iter().map(|b| label(b)).collect::<Vec<_>>(), ["default"], "{rel}");
    let caps = attr(ns[0].body(), "capabilities").unwrap().evaluate(&hcl::eval::Context::new()).unwrap();
    let caps: BTreeSet<String> = match caps {
        hcl::Value::Array(a) => a.iter().map(|v| hcl_str(v).unwrap()).collect(),
        other => panic!("{other:?}"),
    };
    // POST /v1/job/<job>/scale and POST /v1/allocation/<id>/stop (services/autoscaler/src/driver.rs).
    assert!(caps.contains("scale-job") || caps.contains("submit-job"), "{caps:?}");
    assert!(caps.contains("alloc-lifecycle"), "{caps:?}");
    let driver = read("services/autoscaler/src/driver.rs");
    assert!(
        driver.contains("/v1/job/{}/scale") && driver.contains("/v1/allocation/{alloc}/stop"),
        "the driver's calls changed"
    );
}

fn infra_num(f: &NomadFile, e: &hcl::Expression) -> u64 {
    f.eval(e).unwrap().as_u64().expect("number")
}

/// Every SUNDARA_* / OTEL_* name anywhere in infra/ (comments included) is one the binary reads.
#[test]
fn every_variable_named_in_infra_is_read_by_the_binary() {
    let accepted = all_accepted_env();
    for name in [
        "SUNDARA_NATS_URL",
        "SUNDARA_REDIS_URL",
        "SUNDARA_METRICS_ADDR",
        "SUNDARA_LOG_FORMAT",
        "SUNDARA_SECRET",
        "NOMAD_TOKEN",
    ] {
        assert!(accepted.contains(name), "the binary no longer reads {name}: {accepted:?}");
    }
    let operations = read("docs/operations.md");
    for name in SDK_ENV {
        assert!(operations.contains(name), "docs/operations.md no longer says the SDK reads {name}");
    }
    let mut files = Vec::new();
    let mut dirs = vec![root().join("infra")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.path().is_dir() {
                dirs.push(e.path());
            } else {
                files.push(e.path());
            }
        }
    }
    let mut unknown = BTreeSet::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let bytes = text.as_bytes();
        for prefix in ["SUNDARA_", "OTEL_"] {
            for (i, _) in text.match_indices(prefix) {
                if i > 0 && (bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_') {
                    continue;
                }
                let name: String = text[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                if !accepted.contains(&name) {
                    unknown.insert(format!("{name} ({})", file.strip_prefix(root()).unwrap().display()));
                }
            }
        }
    }
    assert!(unknown.is_empty(), "variables the binary does not read: {unknown:?}; it reads {accepted:?}");
}

// ------------------------------------------------------------------ observability

#[test]
fn prometheus_scrapes_every_service_and_the_collector_forwards_traces() {
    let doc = compose();
    let services = doc["services"].as_mapping().unwrap();
    let prom: Yaml = serde_yaml::from_str(&read("infra/prometheus.yml")).expect("prometheus.yml is YAML");
    let mut targets = BTreeSet::new();
    let mut ports = BTreeSet::new();
    for job in prom["scrape_configs"].as_sequence().expect("scrape_configs") {
        assert!(job["job_name"].as_str().is_some());
        for sd in job["dns_sd_configs"].as_sequence().into_iter().flatten() {
            for n in sd["names"].as_sequence().unwrap() {
                targets.insert(n.as_str().unwrap().to_string());
            }
            ports.insert(sd["port"].as_u64().expect("dns_sd port"));
        }
    }
    for (name, args, env) in compose_sundara_commands() {
        if args[0] == "models" {
            continue;
        }
        let addr = env.get("SUNDARA_METRICS_ADDR").unwrap_or_else(|| panic!("{name}: no SUNDARA_METRICS_ADDR"));
        let port: u64 = addr.rsplit(':').next().unwrap().parse().unwrap();
        assert!(ports.contains(&port), "{name} serves metrics on {port}, scraped: {ports:?}");
        // The service's own name, or a network alias of it, is resolved by Prometheus.
        let svc = &services[name.as_str()];
        let aliases = svc["networks"]["default"]["aliases"].as_sequence().cloned().unwrap_or_default();
        let found = targets.contains(&name) || aliases.iter().any(|a| targets.contains(a.as_str().unwrap()));
        assert!(found, "Prometheus does not scrape {name} ({targets:?})");
    }
    for t in &targets {
        assert!(services.contains_key(t.as_str()), "Prometheus scrapes {t}, which is no compose service");
    }

    let otel: Yaml = serde_yaml::from_str(&read("infra/otel-collector.yaml")).expect("otel-collector.yaml is YAML");
    let pipelines = otel["service"]["pipelines"].as_mapping().expect("pipelines");
    assert!(pipelines.contains_key("traces"), "no traces pipeline");
    for (name, p) in pipelines {
        for kind in ["receivers", "processors", "exporters"] {
            for c in p[kind].as_sequence().into_iter().flatten() {
                let c = c.as_str().unwrap();
                assert!(otel[kind].get(c).is_some(), "pipeline {name:?} uses {kind} {c}, which is not defined");
            }
        }
    }
    for ext in otel["service"]["extensions"].as_sequence().into_iter().flatten() {
        assert!(otel["extensions"].get(ext.as_str().unwrap()).is_some(), "undefined extension {ext:?}");
    }
    // The services' OTLP endpoint is the collector's gRPC receiver.
    let grpc = otel["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].as_str().expect("OTLP gRPC receiver");
    for (name, _, env) in compose_sundara_commands() {
        let endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT").unwrap_or_else(|| panic!("{name}: no OTLP endpoint"));
        let hostport = endpoint.strip_prefix("http://").expect("http:// endpoint");
        let (host, port) = hostport.split_once(':').unwrap();
        assert!(services.contains_key(host), "{name}: OTLP host {host} is no compose service");
        assert_eq!(Some(port), grpc.rsplit(':').next(), "{name}: OTLP port");
    }
    // Traces reach Jaeger.
    let exporters = pipelines["traces"]["exporters"].as_sequence().unwrap();
    let jaeger = exporters
        .iter()
        .filter_map(|e| otel["exporters"][e.as_str().unwrap()]["endpoint"].as_str())
        .find(|e| e.starts_with("jaeger:"));
    assert!(
        jaeger.is_some() && services.contains_key("jaeger"),
        "the traces pipeline does not export to the jaeger service"
    );
}

/// Metric names in docs/operations.md.
fn documented_metrics() -> BTreeSet<String> {
    metric_names(&read("docs/operations.md"))
}

fn metric_names(text: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    text.match_indices("sundara_")
        .filter(|(i, _)| *i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_'))
        .map(|(i, _)| {
            text[i..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect::<String>()
        })
        .map(|n| n.trim_end_matches('_').to_string())
        .collect()
}

fn json_strings<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a str>) {
    match v {
        serde_json::Value::String(s) => out.push(s),
        serde_json::Value::Array(a) => a.iter().for_each(|v| json_strings(v, out)),
        serde_json::Value::Object(o) => o.values().for_each(|v| json_strings(v, out)),
        _ => {}
    }
}

/// Names used in a dashboard that docs/operations.md does not list (histogram series are
/// checked by their histogram's name).
fn undocumented(used: &BTreeSet<String>, documented: &BTreeSet<String>) -> Vec<String> {
    used.iter()
        .filter(|n| {
            !documented.contains(*n)
                && !["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| n.strip_suffix(s).is_some_and(|b| documented.contains(b)))
        })
        .cloned()
        .collect()
}

#[test]
fn grafana_dashboard_uses_the_provisioned_datasource_and_documented_metrics() {
    let ds: Yaml = serde_yaml::from_str(&read("infra/grafana/provisioning/datasources/prometheus.yaml"))
        .expect("datasources YAML");
    let prom = ds["datasources"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|d| d["type"].as_str() == Some("prometheus"))
        .expect("a Prometheus data source");
    let uid = prom["uid"].as_str().expect("data source uid");
    let url = prom["url"].as_str().unwrap();
    assert!(url.starts_with("http://prometheus:9090"), "{url}");

    let providers: Yaml = serde_yaml::from_str(&read("infra/grafana/provisioning/dashboards/sundara.yaml"))
        .expect("dashboard provider YAML");
    let path = providers["providers"][0]["options"]["path"].as_str().expect("provider path");
    let doc = compose();
    let grafana = &doc["services"]["grafana"];
    let mounts = strings(&grafana["volumes"], "grafana volumes");
    let dashboards_dir = mounts
        .iter()
        .find_map(|m| {
            let mut p = m.split(':');
            let (src, dst) = (p.next().unwrap(), p.next().unwrap());
            (dst == path).then(|| root().join("infra").join(src))
        })
        .unwrap_or_else(|| panic!("nothing is mounted at the provider's path {path}"));
    assert!(dashboards_dir.join("sundara.json").is_file());
    assert!(mounts.iter().any(|m| m.starts_with("./grafana/provisioning:/etc/grafana/provisioning")));

    let dash: serde_json::Value =
        serde_json::from_str(&read("infra/grafana/dashboards/sundara.json")).expect("the dashboard is JSON");
    assert!(dash["schemaVersion"].as_u64().is_some_and(|v| v >= 36), "schemaVersion");
    let panels = dash["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut used = BTreeSet::new();
    for p in panels {
        assert!(ids.insert(p["id"].as_u64().expect("panel id")), "duplicate panel id {}", p["id"]);
        let grid = &p["gridPos"];
        assert!(
            grid["x"].as_u64().unwrap() + grid["w"].as_u64().unwrap() <= 24,
            "panel {} is wider than the grid",
            p["title"]
        );
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"].as_str(), Some(uid), "panel {}", p["title"]);
        let targets = p["targets"]
            .as_array()
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| panic!("panel {} has no query", p["title"]));
        for t in targets {
            assert_eq!(t["datasource"]["uid"].as_str(), Some(uid), "panel {}", p["title"]);
            let expr = t["expr"]
                .as_str()
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| panic!("panel {}: empty query", p["title"]));
            assert_eq!(expr.matches('(').count(), expr.matches(')').count(), "unbalanced: {expr}");
            assert!(expr.contains("sundara_"), "panel {} queries no Sundara metric", p["title"]);
        }
    }
    let mut all = Vec::new();
    json_strings(&dash, &mut all);
    for s in all {
        used.extend(metric_names(s));
    }
    for t in dash["templating"]["list"].as_array().into_iter().flatten() {
        if t["type"] == "query" {
            assert_eq!(t["datasource"]["uid"].as_str(), Some(uid), "variable {}", t["name"]);
        }
    }
    // Every area of issue 7's dashboard is there.
    for needed in [
        "sundara_verifier_verdicts_total",
        "sundara_ingress_accepted_total",
        "sundara_ingress_rejected_total",
        "sundara_task_stage_seconds_bucket",
        "sundara_queue_depth",
        "sundara_fleet_slots",
        "sundara_fleet_slots_in_use",
        "sundara_fleet_workers",
        "sundara_worker_batch_size_bucket",
        "sundara_worker_inference_seconds_bucket",
        "sundara_verifier_rejected_total",
        "sundara_verifier_reference_runs_total",
        "sundara_quarantines_total",
        "sundara_rewarder_outcomes_total",
        "sundara_rewarder_epoch_weight",
    ] {
        assert!(used.contains(needed), "the dashboard does not show {needed}");
    }
    let missing = undocumented(&used, &documented_metrics());
    assert!(
        missing.is_empty(),
        "metrics queried by infra/grafana/dashboards/sundara.json but not listed in docs/operations.md: {missing:?}"
    );
}

// ------------------------------------------------------------------ image

#[test]
fn dockerfile_builds_the_binary_models_and_runtime() {
    let (stages, args) = dockerfile();
    let names: Vec<&str> = stages.iter().map(|s| s.name.as_str()).collect();
    for s in ["builder", "models", "runtime", "operator"] {
        assert!(names.contains(&s), "no stage {s}: {names:?}");
    }
    assert_eq!(names.last(), Some(&"runtime"), "the default target (last stage) is the runtime image");
    let stage = |n: &str| stages.iter().find(|s| s.name == n).unwrap();
    let builder = stage("builder").body.join("\n");
    assert!(builder.contains("cargo build --release --locked --bin sundara"), "{builder}");
    assert!(
        builder.contains("--mount=type=cache") && builder.contains("target=/usr/local/cargo/registry"),
        "cache mounts"
    );
    let models = stage("models").body.join("\n");
    assert!(models.contains("make_models.py /models"), "{models}");
    // The same pins as scripts/setup.
    let setup = read("scripts/setup");
    let pin = |var: &str| {
        setup
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{var}=")))
            .unwrap_or_else(|| panic!("scripts/setup has no {var}"))
            .to_string()
    };
    assert!(models.contains(&format!("onnx=={}", pin("ONNX_VERSION"))), "onnx pin");
    assert!(models.contains(&format!("numpy=={}", pin("NUMPY_VERSION"))), "numpy pin");
    assert_eq!(args.get("ORT_VERSION").map(String::as_str), Some(pin("ONNXRUNTIME_VERSION").as_str()));
    assert_eq!(args.get("ORT_PACKAGE").map(String::as_str), Some("onnxruntime"));
    assert!(args.get("RUST_IMAGE").is_some_and(|i| i.starts_with("rust:1.95")), "{args:?}");

    // The runtime's chain of stages: a venv in /opt/sundara (the project root), the binary, the
    // models, a non-root user, and `sundara` as the entrypoint.
    let mut chain = Vec::new();
    let mut s = stage("runtime");
    loop {
        chain.push(s);
        match stages.iter().find(|p| p.name == s.from) {
            Some(parent) => s = parent,
            None => break,
        }
    }
    let body: Vec<&String> = chain.iter().rev().flat_map(|s| &s.body).collect();
    let last = |instr: &str| body.iter().rev().find(|l| l.starts_with(instr)).map(|l| l.as_str());
    assert_eq!(last("ENTRYPOINT"), Some(r#"ENTRYPOINT ["sundara"]"#));
    assert_eq!(last("WORKDIR"), Some("WORKDIR /opt/sundara"));
    let user = last("USER ").expect("USER");
    assert!(!user.ends_with("root") && !user.ends_with(" 0"), "runs as root: {user}");
    let all = body.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n");
    assert!(all.contains("python -m venv /opt/sundara/.venv"), "venv");
    assert!(all.contains(r#""${ORT_PACKAGE}==${ORT_VERSION}""#), "onnxruntime install");
    assert!(all.contains("COPY --from=builder /out/sundara /usr/local/bin/sundara"), "binary");
    assert!(all.contains("/models/mlp.onnx") && all.contains("/opt/sundara/models/"), "models");
    assert!(all.contains("/opt/sundara/.cache"), "a writable cache dir");
    for s in &stages {
        for l in &s.body {
            if let Some(from) = l.split_whitespace().find_map(|w| w.strip_prefix("--from=")) {
                assert!(names.contains(&from), "COPY --from={from} is no stage");
            }
        }
    }

    let ignore = read(".dockerignore");
    for p in ["target/", ".venv/", ".cache/", ".git/"] {
        assert!(ignore.lines().any(|l| l.trim() == p), ".dockerignore does not exclude {p}");
    }
}

// ------------------------------------------------------------------ nats-server, as the real one runs infra/'s configs

/// A nats-server started on a config file with free ports (scripts/setup's binary), and its
/// `/varz`: what the server makes of the settings, not what a parser here thinks. Killed
/// when dropped.
struct Served {
    child: std::process::Child,
    port: u16,
    varz: serde_json::Value,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nats_binary() -> Option<PathBuf> {
    match sundara::stack::nats_server_binary(&root()) {
        Ok(binary) => Some(binary),
        Err(e) => {
            println!("SKIPPED: no nats-server to run infra/'s configs on ({e}); run scripts/setup");
            None
        }
    }
}

fn serve_nats(binary: &Path, conf: &Path) -> Result<Served, String> {
    let (port, monitor) = (sundara::stack::free_port().unwrap(), sundara::stack::free_port().unwrap());
    let mut child = Command::new(binary)
        .arg("-c")
        .arg(conf)
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-m", &monitor.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("nats-server runs");
    // The server announces readiness on no channel a test can await: poll its /varz briefly.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let varz = loop {
        if let Ok((200, body)) = sundara::stack::http_get(monitor, "/varz") {
            break body;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            return Err(format!("nats-server refused {} ({status}): {err}", conf.display()));
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            return Err("nats-server never served /varz".into());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    Ok(Served { child, port, varz: serde_json::from_str(&varz).unwrap() })
}

/// The `max_payload` nats-server takes from config `text` (nothing else in it).
fn served_max_payload(binary: &Path, text: &str) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("nats.conf");
    std::fs::write(&conf, text).unwrap();
    let served = serve_nats(binary, &conf).unwrap_or_else(|e| panic!("{e}"));
    served.varz["max_payload"].as_u64().expect("/varz has max_payload")
}

/// Connects with the Sundara client over TLS pinning `ca`, with `creds` if given.
fn tls_connects(port: u16, ca: &Path, creds: Option<&Path>) -> Result<(), String> {
    let endpoint = sundara_common::nats::NatsEndpoint {
        url: format!("tls://127.0.0.1:{port}"),
        credentials: creds.map(Path::to_path_buf),
        tls: Some(sundara_common::tls::NatsTls::pinned(ca)),
        hotkey: None,
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let client = sundara_common::nats::connect(&endpoint, "deployment-test").await.map_err(|e| e.to_string())?;
        client.flush().await.map_err(|e| e.to_string())
    })
}

/// Whether a client speaking plain text gets an answer (a PONG) from the server on `port`.
fn plain_text_answered(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
    stream.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    let _ = stream.write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\nPING\r\n");
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
        if String::from_utf8_lossy(&seen).contains("PONG") {
            return true;
        }
    }
    false
}

/// What is wrong with a served nats-server for Sundara: a payload limit below the largest
/// submission, TLS or users off, a plain-text client or one without credentials let in, or
/// `creds` (a user's seed) refused.
fn served_problems(served: &Served, ca: &Path, creds: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    let want = sundara_schemas::NATS_MAX_PAYLOAD as u64;
    let max_payload = served.varz["max_payload"].as_u64().unwrap_or(0);
    if max_payload < want {
        problems.push(format!("max_payload {max_payload}, under {want}"));
    }
    if served.varz["tls_required"] != serde_json::Value::Bool(true) {
        problems.push("TLS is not required".into());
    }
    if served.varz["auth_required"] != serde_json::Value::Bool(true) {
        problems.push("authentication is not required".into());
    }
    for (server, what) in [("websocket", "a websocket"), ("mqtt", "an MQTT"), ("leaf", "a leafnode")] {
        if served.varz[server]["port"].as_u64().is_some_and(|p| p != 0) {
            problems.push(format!("{what} listener"));
        }
    }
    if plain_text_answered(served.port) {
        problems.push("a plain-text client is answered".into());
    }
    if tls_connects(served.port, ca, None).is_ok() {
        problems.push("a client without credentials is let in".into());
    }
    if let Err(e) = tls_connects(served.port, ca, Some(creds)) {
        problems.push(format!("{} is refused: {e}", creds.display()));
    }
    problems
}

/// Static checks of a nats-server config (comments dropped): TLS with a certificate, the
/// users included, and nothing that lets a client in without them.
fn nats_config_problems(text: &str) -> Vec<String> {
    let text: String = text
        .lines()
        .map(|l| {
            let l = l.trim();
            if l.starts_with('#') || l.starts_with("//") { "" } else { l }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let mut problems = Vec::new();
    if !(text.contains("tls {") || text.contains("tls: {") || text.contains("tls = {")) {
        problems.push("no tls block".into());
    }
    for key in ["cert_file", "key_file"] {
        if !text.contains(key) {
            problems.push(format!("no {key}"));
        }
    }
    if !text.lines().any(|l| l.starts_with("include ") && l.contains("auth.conf")) {
        problems.push("does not include the users (auth.conf)".into());
    }
    for key in ["no_auth_user", "allow_non_tls", "websocket", "mqtt", "leafnodes", "authorization", "accounts"] {
        if text.contains(key) {
            problems.push(format!("sets {key}"));
        }
    }
    problems
}

// ------------------------------------------------------------------ secured deployments

/// Compose's one-shot that makes the keys (infra/secrets.sh).
const SECRETS_SERVICE: &str = "secrets";

/// The NATS user (its seed file's stem, as `sundara auth init` names them) each command
/// connects as: each validator service its own, the validator's pools `pool`, the one-shot
/// admin step (streams, models) the validator.
fn nats_user_of(args: &[String]) -> Option<&'static str> {
    Some(match args.first()?.as_str() {
        "ingress" => "service-ingress",
        "scheduler" => "service-scheduler",
        "verifier" => "service-verifier",
        "rewarder" => "service-rewarder",
        "jobs" => "service-jobs",
        "autoscaler" => "service-autoscaler",
        "chain" => "service-chain",
        "worker" => "pool",
        "models" => "validator",
        _ => return None,
    })
}

/// A variable whose value is a secret (not a file's path).
fn secret_name(name: &str) -> bool {
    let n = name.to_ascii_uppercase();
    !n.ends_with("_FILE")
        && !n.ends_with("_CREDS")
        && (n.ends_with("_AUTH") || ["PASSWORD", "SECRET", "TOKEN", "SEED"].iter().any(|w| n.contains(w)))
}

/// `${NAME:?message}` (or `${NAME?message}`): a value compose refuses to start without,
/// and has no default for.
fn required_interpolation(value: &str) -> bool {
    let Some(body) = value.trim().strip_prefix("${").and_then(|b| b.strip_suffix('}')) else { return false };
    let name_end = body.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(body.len());
    name_end > 0 && !body[..name_end].contains('$') && body[name_end..].starts_with(['?', ':']) && {
        let rest = &body[name_end..];
        rest.starts_with(":?") || rest.starts_with('?')
    }
}

/// Key material written out in `text`: PEM private keys, NKey seeds.
fn literal_secrets(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    if text.contains("PRIVATE KEY-----") {
        found.push("a PEM private key".into());
    }
    for word in text.split(|c: char| !c.is_ascii_alphanumeric()) {
        if word.len() == 58
            && word.starts_with('S')
            && word.chars().all(|c| c.is_ascii_uppercase() || ('2'..='7').contains(&c))
        {
            found.push(format!("an NKey seed {}…", &word[..4]));
        }
    }
    found
}

/// `(source, target, read_only)` of a compose service's volumes (short syntax).
fn mounts_of(svc: &Yaml) -> Vec<(String, String, bool)> {
    svc["volumes"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|v| {
            let mut parts = v.as_str()?.split(':');
            let (source, target) = (parts.next()?.to_string(), parts.next()?.to_string());
            Some((source, target, parts.next() == Some("ro")))
        })
        .collect()
}

/// The mount of `svc` that holds container path `path`: `(source, path inside the source, read-only)`.
fn mount_holding(svc: &Yaml, path: &str) -> Option<(String, String, bool)> {
    mounts_of(svc)
        .into_iter()
        .filter_map(|(source, target, ro)| {
            let rel = Path::new(path).strip_prefix(&target).ok()?.to_str()?.to_string();
            Some((target.len(), (source, rel, ro)))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, m)| m)
}

/// Everything compose's files must say for a secured stack, checked on `doc` (the merged
/// compose.yaml, or a changed copy) without running anything.
fn compose_security_problems(doc: &Yaml) -> Vec<String> {
    let mut problems = Vec::new();
    let services = &doc["services"];
    let secrets = &services[SECRETS_SERVICE];
    if secrets.is_null() {
        return vec![format!("no `{SECRETS_SERVICE}` service makes the keys")];
    }
    if secrets["restart"].as_str() != Some("no") {
        problems.push(format!("{SECRETS_SERVICE}: a one-shot must not restart"));
    }
    // The named volumes the keys' one-shot writes.
    let key_volumes: BTreeSet<String> = mounts_of(secrets)
        .into_iter()
        .filter(|(source, target, ro)| !ro && !source.starts_with(['.', '/']) && target.starts_with('/'))
        .map(|(source, _, _)| source)
        .collect();
    if key_volumes.is_empty() {
        problems.push(format!("{SECRETS_SERVICE} writes no volume"));
    }
    let after_secrets = |name: &str| {
        services[name]["depends_on"][SECRETS_SERVICE]["condition"].as_str() == Some("service_completed_successfully")
    };

    // nats: TLS and the users, from the keys' volume.
    let nats = &services["nats"];
    if !after_secrets("nats") {
        problems.push("nats does not wait for the keys".into());
    }
    let command = strings(&nats["command"], "nats command");
    match value_of(&command, "-c").and_then(|path| mount_holding(nats, path)) {
        Some((source, rel, _)) if source.starts_with('.') => {
            let mut file = root().join("infra").join(&source);
            if !rel.is_empty() {
                file = file.join(rel);
            }
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            problems.extend(nats_config_problems(&text).into_iter().map(|p| format!("nats' config: {p}")));
            for path in text.split('"').skip(1).step_by(2).filter(|p| p.starts_with('/')) {
                if !mount_holding(nats, path).is_some_and(|(source, _, _)| key_volumes.contains(&source)) {
                    problems.push(format!("nats' config names {path}, not in the keys' volume"));
                }
            }
        }
        _ => problems.push("nats' config (-c) is not a file of infra/ mounted into it".into()),
    }
    if command.iter().any(|a| a == "--no_auth" || a.starts_with("--user") || a.starts_with("--pass")) {
        problems.push(format!("nats' command line sets users: {command:?}"));
    }

    // redis: a password, from the keys' volume or a required variable, never written here.
    let redis = &services["redis"];
    let command = strings(&redis["command"], "redis command");
    match value_of(&command, "--aclfile") {
        Some(acl) if mount_holding(redis, acl).is_some_and(|(source, _, _)| key_volumes.contains(&source)) => {
            if !after_secrets("redis") {
                problems.push("redis does not wait for its ACL".into());
            }
        }
        Some(acl) => problems.push(format!("redis' ACL {acl} is not in a volume the keys' one-shot writes")),
        None => match value_of(&command, "--requirepass") {
            Some(p) if required_interpolation(p) => {}
            Some(_) => problems.push("redis' password is written in compose.yaml".into()),
            None => problems.push("redis requires no password (--aclfile or --requirepass)".into()),
        },
    }
    let health = strings(&redis["healthcheck"]["test"], "redis healthcheck").join(" ");
    let authenticated = health.contains("--user") || health.contains(" -a ") || health.contains("--pass");
    if !(health.contains("redis-cli") && authenticated && health.contains("PONG")) {
        problems.push(format!("redis' healthcheck does not ping with the password and expect PONG: {health}"));
    }

    // Every variable holding a secret comes from a required variable, none is written here.
    for (name, svc) in services.as_mapping().into_iter().flatten() {
        let name = name.as_str().unwrap();
        for (key, value) in env_map(svc) {
            if secret_name(&key) && !required_interpolation(&value) {
                problems.push(format!("{name}: {key} is not a required variable (${{{key}:?...}}): {value:?}"));
            }
            if key == "SUNDARA_REDIS_URL" {
                let password = value
                    .split_once("://")
                    .and_then(|(_, rest)| rest.split_once('@'))
                    .and_then(|(user_info, _)| user_info.split_once(':'))
                    .map(|(_, password)| password);
                if !password.is_some_and(required_interpolation) {
                    problems
                        .push(format!("{name}: SUNDARA_REDIS_URL has no password from a required variable: {value:?}"));
                }
            }
        }
    }

    // Every sundara process: NATS over TLS pinning the CA, as its own user, with keys from
    // the keys' volumes, read-only.
    for (name, args, env) in compose_sundara_commands_of(doc) {
        let svc = &services[name.as_str()];
        if !svc["depends_on"]["nats"].is_mapping() && !after_secrets(&name) {
            problems.push(format!("{name}: starts before the keys exist"));
        }
        match env.get("SUNDARA_NATS_URL") {
            Some(url) if url.split(',').all(|u| u.trim().starts_with("tls://")) => {}
            url => problems.push(format!("{name}: SUNDARA_NATS_URL {url:?} is not tls://")),
        }
        let from_keys = |var: &str, problems: &mut Vec<String>| -> Option<String> {
            let Some(path) = env.get(var) else {
                problems.push(format!("{name}: no {var}"));
                return None;
            };
            match mount_holding(svc, path) {
                Some((source, rel, ro)) if key_volumes.contains(&source) => {
                    if !ro {
                        problems.push(format!("{name}: {source} is mounted writable"));
                    }
                    Some(rel)
                }
                _ => {
                    problems.push(format!("{name}: {var} {path} is not in a volume the keys' one-shot writes"));
                    None
                }
            }
        };
        if let Some(rel) = from_keys("SUNDARA_NATS_CA", &mut problems)
            && !rel.ends_with("ca.pem")
        {
            problems.push(format!("{name}: SUNDARA_NATS_CA is {rel}, not the CA (ca.pem)"));
        }
        let user = nats_user_of(&args);
        if let Some(rel) = from_keys("SUNDARA_NATS_CREDS", &mut problems) {
            let file = Path::new(&rel).file_name().and_then(|f| f.to_str()).unwrap_or("");
            if user.is_none_or(|u| file != format!("{u}.nk")) {
                problems.push(format!("{name}: connects as {file}, not {}.nk", user.unwrap_or("?")));
            }
        }
        let signs = ["scheduler", "verifier"].contains(&args[0].as_str());
        for var in ["SUNDARA_SECRET", "SUNDARA_SECRET_FILE"] {
            let compose_driven = value_of(&args, "--driver") == Some("compose");
            if env.contains_key(var) && !signs && !compose_driven {
                problems.push(format!("{name}: given the validator secret ({var})"));
            }
        }
        if signs {
            if env.contains_key("SUNDARA_SECRET_FILE") {
                from_keys("SUNDARA_SECRET_FILE", &mut problems);
            } else if !env_map(svc).get("SUNDARA_SECRET").is_some_and(|v| required_interpolation(v)) {
                problems.push(format!("{name}: no validator secret from a file or a required variable"));
            }
        }
    }
    problems
}

/// A container's view of `mounts` (container path, path here) under a fresh directory.
fn container_view(mounts: &[(String, PathBuf)]) -> tempfile::TempDir {
    let view = tempfile::tempdir().unwrap();
    for (target, source) in mounts {
        let at = view.path().join(target.trim_start_matches('/'));
        std::fs::create_dir_all(at.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(source, &at).unwrap();
    }
    view
}

/// A config file seen from inside `view`: every quoted absolute path moved into it. Written
/// beside the original, so that relative includes resolve as in the container.
fn rebased_config(view: &Path, path: &str) -> PathBuf {
    let inside = view.join(path.trim_start_matches('/'));
    let text = std::fs::read_to_string(&inside).unwrap_or_else(|e| panic!("{}: {e}", inside.display()));
    let rebased = text.replace("\"/", &format!("\"{}/", view.display()));
    let out = inside.with_extension("rebased.conf");
    std::fs::write(&out, rebased).unwrap();
    out
}

/// Runs infra/secrets.sh as compose's `secrets` service would, with its volumes in `volumes`
/// (one directory per named volume).
fn run_secrets_script(volumes: &Path, env: &[(&str, &str)]) -> Result<(), String> {
    let doc = compose();
    let secrets = &doc["services"][SECRETS_SERVICE];
    let entrypoint = strings(&secrets["entrypoint"], "secrets entrypoint");
    let script = entrypoint.last().expect("an entrypoint");
    let (source, rel, _) = mount_holding(secrets, script).expect("the script is mounted");
    let script =
        if rel.is_empty() { root().join("infra").join(source) } else { root().join("infra").join(source).join(rel) };
    let bin = Path::new(env!("CARGO_BIN_EXE_sundara")).parent().unwrap();
    let mut cmd = Command::new("/bin/sh");
    cmd.arg(&script);
    for (k, _) in std::env::vars() {
        if k.starts_with("SUNDARA_") || k.starts_with("OTEL_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("PATH", format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default()));
    // Each volume's mount point, as the script reads it: /pool-secrets is POOL_SECRETS_DIR.
    for (source, target, _) in mounts_of(secrets) {
        if !source.starts_with(['.', '/']) {
            let var = format!("{}_DIR", target.trim_start_matches('/').replace('-', "_").to_ascii_uppercase());
            let dir = volumes.join(&source);
            std::fs::create_dir_all(&dir).unwrap();
            cmd.env(var, dir);
        }
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().expect("sh runs");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "infra/secrets.sh failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// `mounts_of` a compose service, resolved here: named volumes to `volumes/<name>`, bind
/// mounts to infra/.
fn resolved_mounts(svc: &Yaml, volumes: &Path) -> Vec<(String, PathBuf)> {
    mounts_of(svc)
        .into_iter()
        .map(|(source, target, _)| {
            let here = if source.starts_with('.') {
                root().join("infra").join(&source)
            } else {
                let dir = volumes.join(&source);
                std::fs::create_dir_all(&dir).unwrap();
                dir
            };
            (target, here)
        })
        .collect()
}

/// Starts redis-server on an ACL file and says what is wrong: a client without the password
/// let in, or `url` (with its password) refused.
fn redis_acl_problems(acl: &Path, url: &str) -> Vec<String> {
    let Ok(binary) = sundara::stack::redis_server_binary() else {
        println!("SKIPPED: no redis-server to check the ACL on");
        return Vec::new();
    };
    let dir = tempfile::tempdir().unwrap();
    let port = sundara::stack::free_port().unwrap();
    let mut child = Command::new(binary)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--aclfile")
        .arg(acl)
        .arg("--dir")
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("redis-server runs");
    let ping = |url: &str| -> Result<String, String> {
        let client = redis::Client::open(url).map_err(|e| e.to_string())?;
        let mut con = client.get_connection().map_err(|e| e.to_string())?;
        redis::cmd("PING").query::<String>(&mut con).map_err(|e| e.to_string())
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if std::time::Instant::now() > deadline || child.try_wait().ok().flatten().is_some() {
            let _ = child.kill();
            return vec![format!("redis-server did not start on ACL {}", acl.display())];
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut problems = Vec::new();
    if ping(&format!("redis://127.0.0.1:{port}/")).is_ok() {
        problems.push("a client without the password is answered".into());
    }
    let url = url.replace("@redis:6379/", &format!("@127.0.0.1:{port}/"));
    if let Err(e) = ping(&url) {
        problems.push(format!("the services' URL is refused: {e}"));
    }
    let _ = child.kill();
    let _ = child.wait();
    problems
}

/// Compose runs secured: the static checks, then the keys' one-shot run for real (twice: it
/// must keep what it made) and the stores served on what it wrote, as each container sees
/// its volumes.
#[test]
fn compose_stack_is_secured() {
    let doc = compose();
    let problems = compose_security_problems(&doc);
    assert!(problems.is_empty(), "infra/compose.yaml:\n  {}", problems.join("\n  "));

    let volumes = tempfile::tempdir().unwrap();
    // An outside miner's own key, handed over as its public key.
    let keygen = sundara(&[
        "auth".into(),
        "keygen".into(),
        "--miner".into(),
        "m9".into(),
        "--out".into(),
        volumes.path().join("m9.nk").display().to_string(),
    ]);
    assert!(keygen.status.success(), "auth keygen: {}", String::from_utf8_lossy(&keygen.stderr));
    let public_key = String::from_utf8_lossy(&keygen.stdout)
        .split_whitespace()
        .find(|w| w.len() == 56 && w.starts_with('U'))
        .expect("keygen prints the public key")
        .to_string();
    let miner_keys = format!("m9={public_key}");
    // The value compose_interpolate gives the required REDIS_PASSWORD.
    let env = [
        ("REDIS_PASSWORD", "test-REDIS_PASSWORD"),
        ("NATS_HOSTS", "nats.example.org 203.0.113.7"),
        ("TENANTS", "default acme"),
        ("MINER_KEYS", miner_keys.as_str()),
    ];
    run_secrets_script(volumes.path(), &env).unwrap_or_else(|e| panic!("{e}"));
    let snapshot = |dir: &Path| -> BTreeMap<PathBuf, Vec<u8>> {
        let mut files = BTreeMap::new();
        let mut dirs = vec![dir.to_path_buf()];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                if e.path().is_dir() {
                    dirs.push(e.path());
                } else if !e.path().ends_with("auth.conf") {
                    files.insert(e.path(), std::fs::read(e.path()).unwrap());
                }
            }
        }
        files
    };
    let first = snapshot(volumes.path());
    run_secrets_script(volumes.path(), &env).unwrap_or_else(|e| panic!("run again: {e}"));
    assert_eq!(snapshot(volumes.path()), first, "a second run (`docker compose up` again) changed the keys");

    // Every sundara container finds its files through its own mounts.
    let services = &doc["services"];
    let mut problems = Vec::new();
    for (name, args, env) in compose_sundara_commands() {
        let view = container_view(&resolved_mounts(&services[name.as_str()], volumes.path()));
        let inside = |path: &str| view.path().join(path.trim_start_matches('/'));
        for var in ["SUNDARA_NATS_CA", "SUNDARA_NATS_CREDS", "SUNDARA_SECRET_FILE"] {
            if let Some(path) = env.get(var)
                && !inside(path).is_file()
            {
                problems.push(format!("{name}: {var} {path}: no such file in its volumes"));
            }
        }
        if let Some(secret) = env.get("SUNDARA_SECRET_FILE").and_then(|p| std::fs::read_to_string(inside(p)).ok())
            && secret.trim_end().len() < sundara_common::validator_key::MIN_SECRET_BYTES
        {
            problems.push(format!("{name}: the validator secret is too short"));
        }
        // The validator's pools see their own seed only.
        if nats_user_of(&args) == Some("pool")
            && let Some(creds) = env.get("SUNDARA_NATS_CREDS")
        {
            let auth = inside(creds).parent().unwrap().to_path_buf();
            let seen: Vec<String> = std::fs::read_dir(&auth)
                .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
                .unwrap_or_default();
            if seen != ["pool.nk"] {
                problems.push(format!("{name}: sees {seen:?} beside its seed"));
            }
        }
    }
    assert!(problems.is_empty(), "compose's containers:\n  {}", problems.join("\n  "));

    // The outside miner's key is a user; its seed never came here.
    let auth_conf = volumes.path().join("sundara-secrets/auth/auth.conf");
    let users = std::fs::read_to_string(&auth_conf).expect("auth.conf");
    assert!(users.contains(&public_key), "the miner key handed over is no user:\n{users}");
    assert!(!volumes.path().join("sundara-secrets/auth/miner-m9.nk").exists());

    // nats-server on compose's config, as the nats container sees its mounts.
    let nats = &services["nats"];
    let commands = compose_sundara_commands();
    let creds_of = |service: &str| {
        let (_, _, env) = commands.iter().find(|(n, _, _)| n == service).expect("service");
        let view = container_view(&resolved_mounts(&services[service], volumes.path()));
        let (ca, creds) = (env["SUNDARA_NATS_CA"].clone(), env["SUNDARA_NATS_CREDS"].clone());
        let copy = |p: &str, to: &str| {
            let dst = volumes.path().join(format!("{service}-{to}"));
            std::fs::copy(view.path().join(p.trim_start_matches('/')), &dst).unwrap();
            dst
        };
        (copy(&ca, "ca.pem"), copy(&creds, "creds.nk"))
    };
    if let Some(binary) = nats_binary() {
        let view = container_view(&resolved_mounts(nats, volumes.path()));
        let command = strings(&nats["command"], "nats command");
        let conf = rebased_config(view.path(), value_of(&command, "-c").unwrap());
        let served = serve_nats(&binary, &conf).unwrap_or_else(|e| panic!("compose's nats-server: {e}"));
        let mut problems = Vec::new();
        for service in ["models", "ingress", "worker"] {
            let (ca, creds) = creds_of(service);
            problems.extend(served_problems(&served, &ca, &creds).into_iter().map(|p| format!("{service}: {p}")));
        }
        // A tenant and the outside miner (with the CA it is handed) get in too.
        let ca = volumes.path().join("sundara-secrets/tls/ca.pem");
        for creds in [volumes.path().join("sundara-secrets/auth/tenant-acme.nk"), volumes.path().join("m9.nk")] {
            if let Err(e) = tls_connects(served.port, &ca, Some(&creds)) {
                problems.push(format!("{}: {e}", creds.display()));
            }
        }
        assert!(problems.is_empty(), "compose's nats-server:\n  {}", problems.join("\n  "));
    }

    // redis-server on the ACL the keys' one-shot wrote, with the services' URL.
    let redis = &services["redis"];
    let view = container_view(&resolved_mounts(redis, volumes.path()));
    let acl = value_of(&strings(&redis["command"], "redis command"), "--aclfile").expect("--aclfile").to_string();
    let (_, _, env) = commands.iter().find(|(n, _, _)| n == "scheduler").unwrap();
    let problems = redis_acl_problems(&view.path().join(acl.trim_start_matches('/')), &env["SUNDARA_REDIS_URL"]);
    assert!(problems.is_empty(), "compose's redis:\n  {}", problems.join("\n  "));
}

// ------------------------------------------------------------------ Nomad, secured

/// Renders a Nomad template as Nomad would with `value(path, key)` for each Nomad variable
/// item, one instance of each service (`sundara-nats` at 10.0.0.9:4222, others port 6379):
/// the text and the variable items read. Only what these jobs use is known (`with
/// nomadVar`, `range nomadService`, `.field`, `| trimSpace`); anything else is an error.
fn render_template(
    data: &str,
    value: &dyn Fn(&str, &str) -> String,
) -> Result<(String, Vec<(String, String)>), String> {
    let unquote = |s: &str| s.strip_prefix('"').and_then(|s| s.strip_suffix('"')).map(String::from);
    let mut out = String::new();
    let mut reads = Vec::new();
    let mut scopes: Vec<(bool, String)> = Vec::new();
    let mut rest = data;
    while let Some(i) = rest.find("{{") {
        out.push_str(&rest[..i]);
        let end = rest[i..].find("}}").ok_or(format!("unterminated {{{{ in {data:?}"))? + i;
        let action = rest[i + 2..end].trim();
        rest = &rest[end + 2..];
        let words: Vec<&str> = action.split_whitespace().collect();
        match words.as_slice() {
            ["with", "nomadVar", path] => scopes.push((true, unquote(path).ok_or("unquoted path")?)),
            ["range", "nomadService", name] => scopes.push((false, unquote(name).ok_or("unquoted name")?)),
            ["end"] => {
                scopes.pop().ok_or(format!("{{{{ end }}}} without a block in {data:?}"))?;
            }
            [field, filters @ ..] if field.starts_with('.') => {
                let (is_var, scope) = scopes.last().ok_or(format!("{field} outside a block"))?;
                let key = &field[1..];
                let v = if *is_var {
                    reads.push((scope.clone(), key.to_string()));
                    value(scope, key)
                } else {
                    match key {
                        "Address" => "10.0.0.9".into(),
                        "Port" => (if scope.contains("nats") { "4222" } else { "6379" }).into(),
                        other => return Err(format!("unknown service field .{other}")),
                    }
                };
                match filters {
                    [] => out.push_str(&v),
                    ["|", "trimSpace"] => out.push_str(v.trim()),
                    other => return Err(format!("unknown filter {other:?}")),
                }
            }
            _ => return Err(format!("unexpected template action {{{{ {action} }}}}")),
        }
    }
    if !scopes.is_empty() {
        return Err(format!("unclosed block in {data:?}"));
    }
    out.push_str(rest);
    Ok((out, reads))
}

/// A placeholder value for an item: `<path#key>`.
fn placeholder(path: &str, key: &str) -> String {
    format!("<{path}#{key}>")
}

/// The uid of the image's `sundara` user (infra/Dockerfile's `useradd --uid`).
fn image_uid() -> u64 {
    let text = read("infra/Dockerfile");
    let words: Vec<&str> = text.split_whitespace().collect();
    let i = words.iter().position(|w| *w == "--uid").expect("useradd --uid in infra/Dockerfile");
    words[i + 1].parse().expect("a numeric uid")
}

/// Variable items (path, key) the jobs read.
type VarReads = BTreeSet<(String, String)>;

/// Variable items (path, key) one template reads, in order.
type ItemReads = Vec<(String, String)>;

/// Everything a Nomad job must say for a secured deployment, checked without Nomad: the
/// problems, and the variable items its templates read.
fn nomad_security_problems(rel: &str, f: &NomadFile) -> (Vec<String>, VarReads) {
    let mut problems = Vec::new();
    let mut all_reads = VarReads::new();
    let job = label(f.job()).to_string();
    let uid = image_uid();
    let tasks = match nomad_tasks(f) {
        Ok(t) => t,
        Err(e) => return (vec![format!("{rel}: {e}")], all_reads),
    };
    for t in &tasks {
        let at = format!("{rel} group {} task {}", t.group, t.task);
        // A task reads its own variables only (Nomad's implicit policy).
        let own = [
            format!("nomad/jobs/{job}"),
            format!("nomad/jobs/{job}/{}", t.group),
            format!("nomad/jobs/{job}/{}/{}", t.group, t.task),
        ];
        let mut env = t.env_values.clone();
        let mut files: BTreeMap<String, (&NomadTemplate, ItemReads)> = BTreeMap::new();
        for tpl in &t.templates {
            let (text, reads) = match render_template(&tpl.data, &placeholder) {
                Ok(r) => r,
                Err(e) => {
                    problems.push(format!("{at}: {e}"));
                    continue;
                }
            };
            for (path, key) in &reads {
                if !own.contains(path) {
                    problems.push(format!("{at}: reads variable {path}, which the task may not read"));
                }
                all_reads.insert((path.clone(), key.clone()));
            }
            let secret = reads.iter().any(|(_, k)| k != "nats_ca");
            if secret {
                if !tpl.destination.starts_with("secrets/") {
                    problems.push(format!("{at}: {} holds a key outside secrets/", tpl.destination));
                }
                if !matches!(tpl.perms.as_deref(), Some("0600" | "0400")) {
                    problems.push(format!("{at}: {} holds a key with perms {:?}", tpl.destination, tpl.perms));
                }
            }
            if tpl.env {
                for line in text.lines() {
                    if let Some((k, v)) = line.split_once('=') {
                        env.insert(k.to_string(), v.to_string());
                    }
                }
            }
            files.insert(format!("/{}", tpl.destination), (tpl, reads));
        }
        for key in t.env_values.keys() {
            if secret_name(key) {
                problems.push(format!("{at}: env block sets {key}: keys come from variables"));
            }
        }
        if !t.image.starts_with("sundara") {
            continue;
        }
        match env.get("SUNDARA_NATS_URL") {
            Some(url) if url.starts_with("tls://") => {}
            url => problems.push(format!("{at}: SUNDARA_NATS_URL {url:?} is not tls://")),
        }
        let file = |var: &str, want_key: &str, secret: bool, problems: &mut Vec<String>| {
            let Some(path) = t.env_values.get(var) else {
                problems.push(format!("{at}: no {var}"));
                return;
            };
            let Some((tpl, reads)) = files.get(path) else {
                problems.push(format!("{at}: {var} {path} is no template's destination"));
                return;
            };
            let keys: Vec<&str> = reads.iter().map(|(_, k)| k.as_str()).collect();
            if keys != [want_key] {
                problems.push(format!("{at}: {var} holds {keys:?}, not {want_key}"));
            }
            if secret && tpl.uid != Some(uid) {
                problems.push(format!("{at}: {path} is not owned by the image's user {uid} (uid = {:?})", tpl.uid));
            }
        };
        file("SUNDARA_NATS_CA", "nats_ca", false, &mut problems);
        let user = nats_user_of(&t.args).unwrap_or("?").replace('-', "_");
        file("SUNDARA_NATS_CREDS", &user, true, &mut problems);
        let signs = ["scheduler", "verifier"].contains(&t.args[0].as_str());
        if env.contains_key("SUNDARA_SECRET") {
            problems.push(format!("{at}: the validator secret in the environment, not a file"));
        }
        if signs {
            file("SUNDARA_SECRET_FILE", "validator_secret", true, &mut problems);
        } else if env.contains_key("SUNDARA_SECRET_FILE")
            || files.values().any(|(_, r)| r.iter().any(|(_, k)| k == "validator_secret"))
        {
            problems.push(format!("{at}: given the validator secret"));
        }
        if let Some(url) = env.get("SUNDARA_REDIS_URL") {
            let password = placeholder(&own[0], "redis_password");
            if !url.starts_with(&format!("redis://sundara:{password}@")) {
                problems.push(format!("{at}: SUNDARA_REDIS_URL {url:?} has not the password of variable {}", own[0]));
            }
        }
    }
    (problems, all_reads)
}

/// `nomad var put PATH key=@file ...` commands in docs/deployment.md: the items each writes.
fn documented_var_puts() -> VarReads {
    let docs = read("docs/deployment.md").replace("\\\n", " ");
    let mut out = VarReads::new();
    for line in docs.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let Some(i) = words.windows(3).position(|w| w == ["nomad", "var", "put"]) {
            let mut rest = words[i + 3..].iter().skip_while(|w| w.starts_with('-'));
            if let Some(path) = rest.next() {
                for item in rest.take_while(|w| !["&&", ";", "|", "#"].contains(w)) {
                    if let Some((key, _)) = item.split_once('=') {
                        out.insert((path.to_string(), key.to_string()));
                    }
                }
            }
        }
    }
    out
}

/// Writes a task's rendered templates under `dir` (its task directory: local/, secrets/).
fn render_task(f: &NomadFile, group: &str, dir: &Path, value: &dyn Fn(&str, &str) -> String) -> Vec<String> {
    let task = nomad_tasks(f).unwrap().into_iter().find(|t| t.group == group).expect("the group's task");
    for tpl in &task.templates {
        let (text, _) = render_template(&tpl.data, value).unwrap();
        let at = dir.join(&tpl.destination);
        std::fs::create_dir_all(at.parent().unwrap()).unwrap();
        std::fs::write(at, text).unwrap();
    }
    task.args
}

/// The Nomad jobs run secured: the static checks, the items they read are those the docs
/// tell operators to write, and sundara-infra's nats-server and Redis, rendered from items
/// made by `sundara tls init` and `sundara auth init`, serve as they must.
#[test]
fn nomad_jobs_are_secured() {
    let mut problems = Vec::new();
    let mut reads = VarReads::new();
    for rel in NOMAD_FILES {
        for set in [false, true] {
            let (p, r) = nomad_security_problems(rel, &nomad_file(rel, set));
            problems.extend(p);
            reads.extend(r);
        }
    }
    let documented = documented_var_puts();
    for (path, key) in &reads {
        if !documented.contains(&(path.clone(), key.clone())) {
            problems
                .push(format!("docs/deployment.md writes no {key} into {path} (`nomad var put {path} {key}=@...`)"));
        }
    }
    problems.sort();
    problems.dedup();
    assert!(problems.is_empty(), "Nomad jobs:\n  {}", problems.join("\n  "));

    // The items, made as the docs say.
    let keys = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = sundara(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert!(out.status.success(), "sundara {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let tls = keys.path().join("nats-tls");
    let auth = keys.path().join("nats-auth");
    run(&["tls", "init", "--dir", tls.to_str().unwrap(), "--host", "nats.example.org"]);
    run(&["auth", "init", "--dir", auth.to_str().unwrap(), "--tenant", "default"]);
    let password = "0123456789abcdef0123456789abcdef";
    let value = |_path: &str, key: &str| -> String {
        let file = |p: PathBuf| std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        match key {
            "server_cert" => file(tls.join("server.pem")),
            "server_key" => file(tls.join("server-key.pem")),
            "auth_conf" => file(auth.join("auth.conf")),
            "nats_ca" => file(tls.join("ca.pem")),
            "redis_password" => format!("{password}\n"),
            other => panic!("no test value for item {other}"),
        }
    };
    let infra = nomad_file(NOMAD_FILES[0], false);
    let task_dir = tempfile::tempdir().unwrap();
    if let Some(binary) = nats_binary() {
        let args = render_task(&infra, "nats", &task_dir.path().join("nats"), &value);
        // The docker driver mounts the task's local/ and secrets/ at /local and /secrets.
        let mounts: Vec<(String, PathBuf)> = ["local", "secrets"]
            .iter()
            .map(|d| {
                let here = task_dir.path().join("nats").join(d);
                std::fs::create_dir_all(&here).unwrap();
                (format!("/{d}"), here)
            })
            .collect();
        let view = container_view(&mounts);
        let conf = rebased_config(view.path(), value_of(&args, "-c").expect("-c"));
        problems.extend(nats_config_problems(&std::fs::read_to_string(&conf).unwrap()));
        let served = serve_nats(&binary, &conf).unwrap_or_else(|e| panic!("Nomad's nats-server: {e}"));
        for user in ["validator", "service-ingress", "pool"] {
            let creds = auth.join(format!("{user}.nk"));
            problems.extend(
                served_problems(&served, &tls.join("ca.pem"), &creds).into_iter().map(|p| format!("{user}: {p}")),
            );
        }
        assert!(problems.is_empty(), "Nomad's nats-server:\n  {}", problems.join("\n  "));
    }
    let args = render_task(&infra, "redis", &task_dir.path().join("redis"), &value);
    let acl = value_of(&args, "--aclfile").expect("redis-server --aclfile");
    let acl = task_dir.path().join("redis").join(acl.trim_start_matches('/'));
    let problems = redis_acl_problems(&acl, &format!("redis://sundara:{password}@redis:6379/"));
    assert!(problems.is_empty(), "Nomad's redis:\n  {}", problems.join("\n  "));
}

/// No file of infra/ holds key material, and the docs say how to make and hand out each key.
#[test]
fn no_key_is_written_in_infra() {
    let mut found = Vec::new();
    let mut dirs = vec![root().join("infra")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.path().is_dir() {
                dirs.push(e.path());
            } else if let Ok(text) = std::fs::read_to_string(e.path()) {
                for what in literal_secrets(&text) {
                    found.push(format!("{}: {what}", e.path().strip_prefix(root()).unwrap().display()));
                }
            }
        }
    }
    assert!(found.is_empty(), "key material in infra/: {found:?}");
    let docs = read("docs/deployment.md");
    for needed in
        ["sundara auth keygen --miner", "--miner-key", "ca.pem", "REDIS_PASSWORD", "validator.secret", "pool.nk"]
    {
        assert!(docs.contains(needed), "docs/deployment.md does not mention {needed}");
    }
}

/// Ingress accepts submissions up to `MAX_SUBMISSION_BYTES`, and its assignments carry the
/// same inputs again: every nats-server that infra/ starts must take `NATS_MAX_PAYLOAD`
/// (the server's own default is 1 MiB, which refused a 3.2 MB task with a raw server
/// error). One limit, set in `sundara_schemas`; compose's and Nomad's servers are checked
/// against it as the real server reads them (compose_stack_is_secured,
/// nomad_jobs_are_secured: `served_problems`); here the constant and the check itself.
#[test]
fn nats_servers_take_the_largest_submission() {
    use sundara_schemas::{MAX_SUBMISSION_BYTES, NATS_MAX_PAYLOAD};
    const { assert!(NATS_MAX_PAYLOAD > MAX_SUBMISSION_BYTES) };
    let ingress = sundara_ingress::Config::new(sundara_common::Endpoints {
        nats: sundara_common::nats::NatsEndpoint::open("nats://127.0.0.1:4222"),
        redis_url: String::new(),
        redis_ca: None,
    });
    assert_eq!(ingress.max_request_bytes, MAX_SUBMISSION_BYTES, "ingress' limit is the one constant");
    assert_eq!(sundara_common::admission::TenantLimits::default().max_payload_bytes, MAX_SUBMISSION_BYTES);
    let want = NATS_MAX_PAYLOAD as u64;
    // Both configs set it (served in the tests above).
    let nomad_conf = read(NOMAD_FILES[0]);
    for (what, text) in [("infra/nats.conf", read("infra/nats.conf")), (NOMAD_FILES[0], nomad_conf)] {
        assert!(text.contains(&format!("max_payload: {want}")), "{what} does not set max_payload: {want}");
    }
    let Some(binary) = nats_binary() else { return };
    assert_eq!(served_max_payload(&binary, "# nothing set\n"), 1 << 20);
    assert!(served_max_payload(&binary, "max_payload: 1MB\n") < want);
    assert_eq!(served_max_payload(&binary, &format!("max_payload: {want}\n")), want);
}

// ------------------------------------------------------------------ the checker itself

/// The checks above must be able to fail: bad command lines, unknown variables and
/// undocumented metrics are caught.
#[test]
fn the_checks_reject_what_is_wrong() {
    let args = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
    assert!(check_command(&args("worker --id w1 --threads 2")).is_ok());
    assert!(check_command(&args("worker --idd w1")).is_err(), "unknown flag");
    assert!(check_command(&args("worker --id w1 --threads two")).is_err(), "bad value");
    assert!(check_command(&args("worker --id w.1")).is_err(), "id with a dot");
    assert!(check_command(&args("worker --id w1 --slice gpu:0")).is_err(), "bad slice");
    assert!(check_command(&args("autoscaler --driver kubernetes")).is_err(), "unknown driver");
    assert!(check_command(&args("autoscaler --min-workers 9 --max-workers 2")).is_err());
    assert!(check_command(&args("verifier --reference-threads 1")).is_ok());
    assert_eq!(unknown_env("worker", ["SUNDARA_NATS_URL", "SUNDARA_NAT_URL", "OTHER"]), ["SUNDARA_NAT_URL"]);
    assert!(
        unknown_env("ingress", ["SUNDARA_SECRET"]).contains(&"SUNDARA_SECRET".to_string()),
        "ingress takes no secret"
    );
    assert!(unknown_env("scheduler", ["SUNDARA_SECRET"]).is_empty());

    let vars = HashMap::from([("HOSTNAME", "h1")]);
    assert_eq!(
        sundara_args_of_script("exec sundara worker --id \"${HOSTNAME}\" --threads 1", &vars).unwrap(),
        ["worker", "--id", "h1", "--threads", "1"]
    );
    assert!(sundara_args_of_script("exec sundara worker --id $(whoami)", &vars).is_err());
    assert!(sundara_args_of_script("sundara worker; rm -rf /", &vars).is_err());
    assert_eq!(compose_interpolate("a $${HOSTNAME} ${X:-d} ${Y:?m} ${Z}").unwrap(), "a ${HOSTNAME} d test-Y ");

    let documented: BTreeSet<String> = ["sundara_a_seconds", "sundara_b_total"].map(String::from).into();
    let used: BTreeSet<String> =
        ["sundara_a_seconds_bucket", "sundara_b_total", "sundara_c_total"].map(String::from).into();
    assert_eq!(undocumented(&used, &documented), ["sundara_c_total"]);
    assert_eq!(template_env_keys("{{ range x }}A_B=1\n{{ end }}C=x=y lower=1"), ["A_B", "C"].map(String::from).into());
}

/// The security checks must be able to fail: each broken variant of compose, the Nomad
/// jobs and nats-server's config is caught.
#[test]
fn the_security_checks_reject_what_is_wrong() {
    // compose, changed one thing at a time.
    let broken = |what: &str, change: &dyn Fn(&mut Yaml), expect: &str| {
        let mut doc = compose();
        change(&mut doc);
        let problems = compose_security_problems(&doc);
        assert!(
            problems.iter().any(|p| p.contains(expect)),
            "{what}: expected a problem with {expect:?}, got {problems:?}"
        );
    };
    let set_env = |service: &'static str, key: &'static str, value: &'static str| {
        move |doc: &mut Yaml| {
            doc["services"][service]["environment"][key] = Yaml::String(value.into());
        }
    };
    // (what, service, variable, its value, the problem expected)
    let environments = [
        ("plain NATS", "ingress", "SUNDARA_NATS_URL", "nats://nats:4222", "is not tls://"),
        ("a worker as the validator", "worker", "SUNDARA_NATS_CREDS", "/secrets/auth/validator.nk", "not pool.nk"),
        (
            "ingress as the scheduler",
            "ingress",
            "SUNDARA_NATS_CREDS",
            "/secrets/auth/service-scheduler.nk",
            "not service-ingress.nk",
        ),
        ("a CA outside the keys", "ingress", "SUNDARA_NATS_CA", "/etc/ssl/ca.pem", "SUNDARA_NATS_CA"),
        (
            "the secret to ingress",
            "ingress",
            "SUNDARA_SECRET_FILE",
            "/secrets/validator.secret",
            "given the validator secret",
        ),
        (
            "a password in the file",
            "redis",
            "REDISCLI_AUTH",
            "hunter2hunter2hunter2",
            "REDISCLI_AUTH is not a required variable",
        ),
        (
            "Redis without a password",
            "ingress",
            "SUNDARA_REDIS_URL",
            "redis://redis:6379/",
            "SUNDARA_REDIS_URL has no password",
        ),
        (
            "a default password",
            "grafana",
            "GF_SECURITY_ADMIN_PASSWORD",
            "${GRAFANA_ADMIN_PASSWORD:-admin}",
            "GF_SECURITY_ADMIN_PASSWORD",
        ),
    ];
    for (what, service, key, value, expect) in environments {
        broken(what, &set_env(service, key, value), expect);
    }
    broken(
        "redis open",
        &|doc: &mut Yaml| {
            doc["services"]["redis"]["command"] =
                serde_yaml::from_str(r#"["redis-server", "--appendonly", "yes"]"#).unwrap();
        },
        "requires no password",
    );
    broken(
        "the secret from no file",
        &|doc: &mut Yaml| {
            doc["services"]["scheduler"]["environment"].as_mapping_mut().unwrap().remove("SUNDARA_SECRET_FILE");
        },
        "no validator secret",
    );
    broken(
        "writable keys",
        &|doc: &mut Yaml| {
            doc["services"]["ingress"]["volumes"] = serde_yaml::from_str(r#"["sundara-secrets:/secrets"]"#).unwrap();
        },
        "mounted writable",
    );
    broken(
        "no keys' one-shot",
        &|doc: &mut Yaml| {
            doc["services"].as_mapping_mut().unwrap().remove(SECRETS_SERVICE);
        },
        "makes the keys",
    );

    // nats-server's config.
    let good = read("infra/nats.conf");
    assert!(nats_config_problems(&good).is_empty(), "{:?}", nats_config_problems(&good));
    assert!(!nats_config_problems("max_payload: 8388608\n").is_empty(), "no TLS, no users");
    assert!(!nats_config_problems(&format!("{good}\nno_auth_user: validator\n")).is_empty());
    assert!(!nats_config_problems(&good.replace("include", "# include")).is_empty(), "users not included");
    assert!(!nats_config_problems(&format!("{good}\nwebsocket {{ port: 8080, no_tls: true }}\n")).is_empty());

    // Nomad, changed one thing at a time.
    let nomad_broken = |rel: &str, from: &str, to: &str, expect: &str| {
        let text = read(rel);
        assert!(text.contains(from), "{rel} has no {from:?}");
        let f = nomad_file_of(rel, &text.replacen(from, to, 1), false);
        let (problems, _) = nomad_security_problems(rel, &f);
        assert!(problems.iter().any(|p| p.contains(expect)), "{from} → {to}: expected {expect:?}, got {problems:?}");
    };
    let validator = NOMAD_FILES[1];
    nomad_broken(validator, "SUNDARA_NATS_URL=tls://{{", "SUNDARA_NATS_URL=nats://{{", "is not tls://");
    nomad_broken(validator, "{{ .service_ingress }}", "{{ .validator }}", "not service_ingress");
    nomad_broken(
        validator,
        r#"\"nomad/jobs/sundara-validator/ingress/ingress\""#,
        r#"\"nomad/jobs/sundara-validator/scheduler/scheduler\""#,
        "may not read",
    );
    nomad_broken(validator, "perms       = \"0600\"\n        uid", "perms       = \"0644\"\n        uid", "with perms");
    nomad_broken(validator, "        uid         = 10001\n", "", "not owned by the image's user");
    nomad_broken(
        validator,
        "SUNDARA_SECRET_FILE  = \"/secrets/validator.secret\"",
        "SUNDARA_SECRET  = \"x\"",
        "SUNDARA_SECRET",
    );
    nomad_broken(validator, "redis://sundara:{{ .redis_password | trimSpace }}@", "redis://", "has not the password");
    nomad_broken(NOMAD_FILES[2], "{{ .pool }}", "{{ .validator }}", "not pool");
    nomad_broken(
        NOMAD_FILES[0],
        "destination = \"secrets/server-key.pem\"",
        "destination = \"local/server-key.pem\"",
        "outside secrets/",
    );

    // Templates with what the renderer does not know are refused, not guessed at.
    assert!(render_template("{{ key \"x\" }}", &placeholder).is_err());
    assert!(render_template("{{ with nomadVar \"a\" }}{{ .b }}", &placeholder).is_err());
    assert_eq!(
        render_template("{{ with nomadVar \"a/b\" }}x={{ .c | trimSpace }}{{ end }}", &|_, _| " v\n".into()).unwrap(),
        ("x=v".to_string(), vec![("a/b".to_string(), "c".to_string())])
    );

    // Literal keys and secret values.
    assert!(!literal_secrets("-----BEGIN PRIVATE KEY-----").is_empty());
    assert!(!literal_secrets(&format!("seed: SU{}", "A".repeat(56))).is_empty());
    assert!(literal_secrets("SUNDARA_NATS_CREDS: /secrets/auth/pool.nk").is_empty());
    assert!(required_interpolation("${REDIS_PASSWORD:?set it}"));
    assert!(!required_interpolation("${REDIS_PASSWORD:-default}") && !required_interpolation("hunter2"));

    // A server without TLS and users is caught by the served checks.
    if let Some(binary) = nats_binary() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("open.conf");
        std::fs::write(&conf, "max_payload: 8388608\n").unwrap();
        let served = serve_nats(&binary, &conf).unwrap();
        let problems = served_problems(&served, &dir.path().join("ca.pem"), &dir.path().join("x.nk"));
        for expect in ["TLS is not required", "authentication is not required", "plain-text client is answered"] {
            assert!(problems.iter().any(|p| p.contains(expect)), "{expect}: {problems:?}");
        }
    }
}
