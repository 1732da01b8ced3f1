use super::*;
use crate::api::ModelPool;

const WORKER: &str = "registry.corp/kubeswarm/inference-worker:0.1.0";

fn spec(yaml: &str) -> ModelPoolSpec {
    let pool: ModelPool = serde_yaml_ng::from_str(&format!(
        "apiVersion: kubeswarm.dev/v1alpha1\nkind: ModelPool\nmetadata: {{name: p, namespace: t}}\nspec: {yaml}\n"
    ))
    .unwrap();
    pool.spec
}

fn fields(denied: &[Denied]) -> Vec<&str> {
    denied.iter().map(|d| d.field).collect()
}

#[test]
fn the_default_policy_refuses_every_way_out_of_the_tenants_boundary() {
    let policy = Policy::default();
    let denied = policy.check(
        &spec(
            "{model: {source: 'file:///etc'}, template: {image: 'evil/miner:1'}, priorityClassName: system-node-critical}",
        ),
        WORKER,
    );
    assert_eq!(
        fields(&denied),
        [
            "spec.model.source",
            "spec.template.image",
            "spec.queueName",
            "spec.priorityClassName"
        ]
    );
    for d in &denied {
        assert!(d.message.contains("Helm value tenancy."), "{d}");
    }
    assert!(
        policy
            .check(
                &spec(&format!(
                    "{{model: {{source: 'pvc://weights/llama'}}, queueName: gpus, template: {{image: '{WORKER}'}}}}"
                )),
                WORKER
            )
            .is_empty(),
        "a pool on a claim, in its queue, on the operator's worker image is fine"
    );
}

#[test]
fn host_paths_are_allowed_only_under_a_listed_prefix_and_never_climb_out() {
    let policy = Policy {
        host_paths: vec!["/var/lib/models/".to_owned()],
        require_queue: false,
        ..Policy::default()
    };
    let source = |path: &str| {
        policy
            .check(
                &spec(&format!("{{model: {{source: 'file://{path}'}}}}")),
                WORKER,
            )
            .into_iter()
            .map(|d| d.message)
            .collect::<Vec<_>>()
    };
    for allowed in [
        "/var/lib/models",
        "/var/lib/models/",
        "/var/lib/models/llama",
        "/var/lib/models/smol.gguf",
        "/var/lib/models/llama/q4.gguf",
    ] {
        assert_eq!(source(allowed), Vec::<String>::new(), "{allowed}");
    }
    for (refused, why) in [
        ("/", "not a plain absolute path"),
        ("/etc", "outside"),
        ("/var/lib/models-other", "outside"),
        ("/var/lib/models/../../../etc", "not a plain absolute path"),
        ("/var/lib/models/./x", "not a plain absolute path"),
        ("/var/lib//models", "not a plain absolute path"),
        // A .gguf path mounts its folder: this one would mount /var/lib.
        ("/var/lib/models.gguf", "outside"),
    ] {
        let messages = source(refused);
        assert!(
            messages.len() == 1 && messages[0].contains(why),
            "{refused}: {messages:?}"
        );
    }
    let off = Policy::default().host_path("/var/lib/models").unwrap_err();
    assert!(off.message.contains("allows none"), "{off}");
}

#[test]
fn worker_images_and_priority_classes_come_from_their_lists() {
    let policy = Policy {
        worker_images: vec![
            "registry.corp/cuda-worker:1.2".to_owned(),
            "registry.corp/team-a/*".to_owned(),
        ],
        priority_classes: vec!["batch-low".to_owned()],
        require_queue: false,
        ..Policy::default()
    };
    let check = |template: &str| {
        fields(&policy.check(
            &spec(&format!("{{model: {{source: 'pvc://w'}}, {template}}}")),
            WORKER,
        ))
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<_>>()
    };
    assert!(check("template: {image: 'registry.corp/cuda-worker:1.2'}").is_empty());
    assert!(check("template: {image: 'registry.corp/team-a/worker:9'}").is_empty());
    assert_eq!(
        check("template: {image: 'registry.corp/cuda-worker:1.3'}"),
        ["spec.template.image"]
    );
    assert_eq!(
        check("template: {image: 'registry.corp/team-ab/worker:9'}"),
        ["spec.template.image"]
    );
    assert!(check("priorityClassName: batch-low").is_empty());
    assert_eq!(
        check("priorityClassName: system-node-critical"),
        ["spec.priorityClassName"]
    );
}

#[test]
fn external_urls_may_not_point_into_the_cluster_or_this_host() {
    let open = External::default();
    for url in [
        "http://169.254.169.254/latest/meta-data",
        "http://127.0.0.1:8000/v1",
        "http://127.1:8000/v1",
        "http://2130706433/v1",
        "http://0x7f.0.0.1/v1",
        "http://\u{ff11}\u{ff16}\u{ff19}.\u{ff12}\u{ff15}\u{ff14}.\u{ff11}\u{ff16}\u{ff19}.\u{ff12}\u{ff15}\u{ff14}/v1",
        "http://[::1]:8000/v1",
        "http://[::ffff:127.0.0.1]/v1",
        "http://[fd00::1]/v1",
        // What a DNS64 resolver answers for 10.0.0.1, at the well-known and a local prefix.
        "http://[64:ff9b::a00:1]/v1",
        "http://[64:ff9b:1::a00:1]/v1",
        "http://kubernetes.default.svc./v1",
        "http://10.96.0.1/v1",
        "http://192.168.1.20/v1",
        "http://0.0.0.0:8000/v1",
        "http://localhost:8000/v1",
        "http://kubernetes/v1",
        "http://kubernetes.default.svc/v1",
        "http://p-workers.other-tenant.svc.cluster.local:8000/v1",
        "http://metadata.google.internal/v1",
        "https://user:sk-secret@api.example.com/v1",
        "not a url",
    ] {
        assert!(open.check_url(url).is_err(), "{url} was allowed");
    }
    assert!(open.check_url("https://api.example.com/v1").is_ok());
    assert!(open.check_url("http://203.0.113.7:8000/v1").is_ok());
    let message = open
        .check_url("http://10.0.0.7/v1")
        .unwrap_err()
        .to_string();
    assert!(
        message.starts_with("spec.external.url: 10.0.0.7 is in 10.0.0.0/8")
            && message.contains("tenancy.external.allow"),
        "{message}"
    );
    assert!(
        !open
            .check_url("https://user:sk-secret@api.example.com/v1")
            .unwrap_err()
            .message
            .contains("sk-secret"),
        "a refusal never repeats the credentials"
    );

    let allowing = External {
        allow: [
            "vllm.inference.svc.cluster.local",
            "*.gpu.corp",
            "10.20.0.0/16",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect(),
        deny: vec!["203.0.113.0/24".parse().unwrap()],
    };
    for url in [
        "http://vllm.inference.svc.cluster.local:8000/v1",
        "http://a.gpu.corp/v1",
        "http://10.20.3.4/v1",
    ] {
        assert!(allowing.check_url(url).is_ok(), "{url}");
    }
    // The admission policy compares names without a trailing dot, so neither check takes
    // one, even on an allowed name.
    let dotted = allowing
        .check_url("http://vllm.inference.svc.cluster.local.:8000/v1")
        .unwrap_err();
    assert_eq!(
        dotted.message,
        "vllm.inference.svc.cluster.local. ends with a dot: write the host name without it"
    );
    for url in [
        "http://a.gpu.corp.svc/v1",
        "http://10.21.0.1/v1",
        "http://203.0.113.7/v1",
    ] {
        assert!(allowing.check_url(url).is_err(), "{url}");
    }
    assert!("not a host!".parse::<Allowed>().is_err());
}

/// A server on loopback that answers every request with `status` and `location`.
async fn answering(
    status: u16,
    location: Option<String>,
) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = hits.clone();
    let app = axum::Router::new().fallback(move || {
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let location = location.clone();
        async move {
            let mut response = axum::response::Response::builder().status(status);
            if let Some(l) = location {
                response = response.header("location", l);
            }
            response.body(axum::body::Body::from("{}")).unwrap()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://localhost:{port}"), hits)
}

#[tokio::test]
async fn the_external_client_refuses_refused_addresses_at_connect_time_and_follows_no_redirect() {
    let (url, hits) = answering(200, None).await;
    // localhost passes no static check, but a name that only resolves there at connect
    // time (DNS rebinding) is what the resolver is for.
    let error = external_client(&External::default())
        .get(&url)
        .send()
        .await
        .unwrap_err();
    let chain = crate::telemetry::chain(&error);
    assert!(
        chain.contains("resolves only to addresses external pools may not reach"),
        "{chain}"
    );
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0);

    let local = External {
        allow: vec!["localhost".parse().unwrap()],
        deny: Vec::new(),
    };
    let client = external_client(&local);
    assert_eq!(client.get(&url).send().await.unwrap().status(), 200);

    // An allowed endpoint that redirects elsewhere is not followed there.
    let (target, target_hits) = answering(200, None).await;
    let (redirecting, _) = answering(307, Some(format!("{target}/latest/meta-data"))).await;
    let response = client.get(&redirecting).send().await.unwrap();
    assert_eq!(response.status(), 307);
    assert_eq!(target_hits.load(std::sync::atomic::Ordering::SeqCst), 0);
}
