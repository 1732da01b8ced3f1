//! kubeswarm end to end: one control plane (e2e/cluster) for the whole run, each test in a
//! namespace of its own, waiting on conditions and never on sleeps.
//!
//! `cargo test` runs this program like any test binary. Arguments that are not flags select
//! the tests whose names contain them; `--list` lists them. The cluster's directory and logs
//! stay behind when a test fails (the path is printed); `KUBESWARM_E2E_KEEP=1` keeps them
//! always.

mod bed;
mod cel;
mod columns;
mod failover;
mod images;
mod kills;
mod load;
mod outage;
mod quota;
mod swarm;
mod tenancy;
mod tests_check;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::ExitCode;
use std::time::Instant;

use bed::Bed;

type Scenario = for<'a> fn(&'a Bed) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + 'a>>;

/// Every test, in the order they run: the cheap API checks first, then the scenarios
/// that run models.
const TESTS: &[(&str, Scenario)] = &[
    ("cel_rules_are_enforced_by_the_api_server", |b| {
        Box::pin(cel::rules_are_enforced(b))
    }),
    ("printer_columns_and_explain", |b| {
        Box::pin(columns::printer_columns_and_explain(b))
    }),
    ("the_bed_runs_the_images_hack_images_builds", |b| {
        Box::pin(images::are_what_the_bed_runs(b))
    }),
    ("tenants_cannot_leave_their_boundary", |b| {
        Box::pin(tenancy::attempts_to_leave_the_boundary_are_refused(b))
    }),
    ("a_swarm_job_runs_to_completion", |b| {
        Box::pin(swarm::runs_to_completion(b))
    }),
    ("outputs_are_tested_in_job_pods", |b| {
        Box::pin(tests_check::outputs_are_tested_in_job_pods(b))
    }),
    ("tenant_quotas_hold_back_the_second_pool", |b| {
        Box::pin(quota::second_tenant_waits(b))
    }),
    ("deleting_a_job_mid_run_removes_its_children", |b| {
        Box::pin(swarm::delete_mid_run(b))
    }),
    ("an_operator_killed_mid_run_resumes", |b| {
        Box::pin(swarm::operator_killed_mid_run(b))
    }),
    ("an_operator_killed_at_each_boundary_resumes", |b| {
        Box::pin(kills::operator_killed_at_each_boundary(b))
    }),
    ("a_higher_priority_pool_preempts", |b| {
        Box::pin(quota::preemption(b))
    }),
    ("a_standby_takes_over_from_a_killed_leader", |b| {
        Box::pin(failover::standby_takes_over(b))
    }),
    // Last: once, the bed's Kueue never saw a namespace created after its API server
    // restarted ("namespace not found" minutes later), so nothing follows this one.
    ("the_api_server_goes_away_mid_job", |b| {
        Box::pin(outage::outages_mid_job(b))
    }),
];

/// Benchmarks: run only when named (`make bench-operator`), never with the tests.
const BENCHMARKS: &[(&str, Scenario)] =
    &[("bench_operator", |b| Box::pin(load::operator_under_load(b)))];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        for (name, _) in TESTS {
            println!("{name}: test");
        }
        return ExitCode::SUCCESS;
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let named = |name: &str| filters.iter().any(|f| name.contains(f.as_str()));
    let selected: Vec<_> = TESTS
        .iter()
        .filter(|(name, _)| filters.is_empty() || named(name))
        .chain(
            BENCHMARKS
                .iter()
                .filter(|(name, _)| filters.iter().any(|f| f.as_str() == *name)),
        )
        .collect();
    if selected.is_empty() {
        println!("running 0 tests");
        return ExitCode::SUCCESS;
    }
    let Some(model) = std::env::var_os("KUBESWARM_TEST_MODEL").map(PathBuf::from) else {
        eprintln!("e2e: KUBESWARM_TEST_MODEL must name the test model (make test sets it)");
        return ExitCode::FAILURE;
    };
    let dir = std::env::temp_dir().join(format!("kubeswarm-e2e-{}", std::process::id()));
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .init();

    // Two rustls providers are compiled in (see the workspace's Cargo.toml): pick one.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime starts");
    let started = Instant::now();
    println!(
        "\nrunning {} e2e tests (cluster in {})",
        selected.len(),
        dir.display()
    );
    let bed = match runtime.block_on(Bed::up(dir.clone(), model)) {
        Ok(bed) => bed,
        Err(err) => {
            eprintln!(
                "e2e: the test bed did not start: {err:#}\nlogs: {}/logs",
                dir.display()
            );
            // The cluster may be up when what failed came after `e2e/cluster up`.
            let _ = bed::cluster(&dir, &["down"]);
            return ExitCode::FAILURE;
        }
    };
    println!("cluster up in {:.0?}", started.elapsed());
    let count = selected.len();
    let mut failed = Vec::new();
    for (name, test) in selected {
        let start = Instant::now();
        match runtime.block_on(test(&bed)) {
            Ok(()) => println!("test {name} ... ok ({:.0?})", start.elapsed()),
            Err(err) => {
                println!(
                    "test {name} ... FAILED ({:.0?})\n{err:#}\n",
                    start.elapsed()
                );
                failed.push(*name);
            }
        }
    }
    if let Err(err) = bed.down() {
        eprintln!("e2e: {err:#}");
    }
    let keep = !failed.is_empty() || std::env::var_os("KUBESWARM_E2E_KEEP").is_some();
    if keep {
        println!("the cluster's logs: {}/logs", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!(
        "\ne2e result: {}. {} passed; {} failed; finished in {:.0?}",
        if failed.is_empty() { "ok" } else { "FAILED" },
        count - failed.len(),
        failed.len(),
        started.elapsed()
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        println!("failures: {}", failed.join(", "));
        ExitCode::FAILURE
    }
}
