//! The Postgres store's own behaviour beyond the shared contract: nodes starting together migrate once, a
//! newer schema is refused, corrupt rows are errors (never panics), a lost connection is `Unavailable` and an
//! append whose connection is lost around its `COMMIT` is committed exactly once. Each test has a database of its own;
//! skipped without a reachable Postgres unless CI=true or AGENTD_REQUIRE_PG=1.

// Tests may unwrap: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use agentd_core::domain::Run;
use agentd_core::store::{Store, StoreError};
use agentd_postgres::PgStore;
use agentd_store_contract::pg::TestDatabase;
use agentd_store_contract::proxy::{Proxy, Trap};
use agentd_store_contract::{delta, new_session, run_started};
use tokio_postgres::NoTls;

async fn raw(db: &TestDatabase) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(db.url(), NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_starting_at_once_apply_the_schema_once() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let opened = futures_util::future::join_all((0..6).map(|_| PgStore::open(db.url(), 2))).await;
    let stores: Vec<PgStore> = opened
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("a node failed to start: {e}")))
        .collect();
    let client = raw(&db).await;
    let versions: Vec<i32> = client
        .query("SELECT version FROM agentd_schema", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, vec![6]);
    // They share one database: what one writes, the others read, and numbering is shared.
    let s = new_session(&stores[0], "alice").await;
    assert_eq!(stores[5].get_session(&s.id).await.unwrap(), Some(s.clone()));
    let a = stores[1].append_events(vec![delta(&s.id, "r", "a")]);
    let b = stores[2].append_events(vec![delta(&s.id, "r", "b")]);
    let (a, b) = tokio::join!(a, b);
    let mut seqs = vec![a.unwrap()[0].seq(), b.unwrap()[0].seq()];
    seqs.sort_unstable();
    assert_eq!(seqs, vec![1, 2]);
    assert_eq!(stores[3].describe(), stores[4].describe());
    assert!(
        stores[3].describe().ends_with(db.name()),
        "{}",
        stores[3].describe()
    );
}

#[tokio::test]
async fn a_version_1_database_gains_the_uploads_table_and_the_node_registry() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = PgStore::open(db.url(), 1).await.unwrap();
    let s = new_session(&store, "alice").await;
    drop(store);
    // As the binary of version 1 left it: no uploads table, no node registry, no `runs.node`.
    raw(&db)
        .await
        .batch_execute(
            "DROP TABLE uploads; DROP TABLE nodes; DROP TABLE commands; DROP TABLE aliases;
             DROP INDEX runs_unfinished_by_session;
             ALTER TABLE runs DROP COLUMN node;
             UPDATE agentd_schema SET version = 1",
        )
        .await
        .unwrap();
    let store = PgStore::open(db.url(), 1).await.unwrap();
    assert_eq!(store.get_session(&s.id).await.unwrap(), Some(s.clone()));
    let up = agentd_store_contract::upload("a.txt", 2);
    store.put_upload(&s.id, &up, b"hi").await.unwrap();
    assert_eq!(
        store.read_upload(&s.id, &up.id).await.unwrap(),
        Some(b"hi".to_vec())
    );
    // The node registry is back: a heartbeat is listed among the live nodes.
    let beat = agentd_core::store::NodeBeat {
        node_id: "n1".into(),
        instance: "i1".into(),
        listen: "127.0.0.1:1".into(),
        started_at: "t".into(),
    };
    store.heartbeat(&beat).await.unwrap();
    let nodes = store
        .live_nodes(std::time::Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(nodes.len(), 1);
    assert_eq!(
        (nodes[0].0.node_id.as_str(), nodes[0].1.as_str()),
        ("n1", "i1")
    );
}

#[tokio::test]
async fn a_database_a_newer_binary_migrated_is_refused() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    drop(PgStore::open(db.url(), 1).await.unwrap());
    raw(&db)
        .await
        .execute("UPDATE agentd_schema SET version = 999", &[])
        .await
        .unwrap();
    let err = PgStore::open(db.url(), 1).await.err().unwrap().to_string();
    assert!(err.contains("999") && err.contains(db.name()), "{err}");
}

#[tokio::test]
async fn corrupt_rows_are_errors_not_panics() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = PgStore::open(db.url(), 2).await.unwrap();
    let s = new_session(&store, "alice").await;
    let run = Run::queued(&s.id);
    store.create_run(&run, None).await.unwrap();
    store.append_events(vec![run_started(&run)]).await.unwrap();

    let client = raw(&db).await;
    client
        .execute(
            "UPDATE sessions SET metadata = '{not json' WHERE id = $1",
            &[&s.id],
        )
        .await
        .unwrap();
    client
        .execute(
            "UPDATE runs SET status = 'exploded' WHERE id = $1",
            &[&run.id],
        )
        .await
        .unwrap();
    client
        .execute(
            "UPDATE events SET payload = '[1,2' WHERE session_id = $1",
            &[&s.id],
        )
        .await
        .unwrap();

    let session = store.get_session(&s.id).await;
    assert!(
        matches!(&session, Err(StoreError::Other(m)) if m.contains("metadata")),
        "{session:?}"
    );
    let runs = store.list_runs(&s.id).await;
    assert!(
        matches!(&runs, Err(StoreError::Other(m)) if m.contains("exploded")),
        "{runs:?}"
    );
    let events = store.read_events(&s.id, 0, 10).await;
    assert!(matches!(&events, Err(StoreError::Other(_))), "{events:?}");
}

#[tokio::test]
async fn bad_urls_are_refused_without_showing_the_password() {
    let err = PgStore::open("postgres://u:s3cret@127.0.0.1:notaport/db", 1)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(!err.contains("s3cret"), "{err}");
    let err = PgStore::open("sqlite://x.db", 1)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("postgres://"), "{err}");
}

#[tokio::test]
async fn an_append_whose_connection_is_lost_at_commit_is_stored_exactly_once() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let (proxy, url) = Proxy::in_front_of(db.url()).await;
    let store = PgStore::open(&url, 2).await.unwrap();
    let s = new_session(&store, "alice").await;
    let mut expected = Vec::new();
    for (i, trap) in [
        Trap::BeforeCommit,
        Trap::AfterCommit,
        Trap::BeforeCommit,
        Trap::AfterCommit,
    ]
    .into_iter()
    .enumerate()
    {
        proxy.trap_next_commit(trap);
        let texts: Vec<String> = (0..3).map(|j| format!("g{i}e{j}")).collect();
        let batch = texts.iter().map(|t| delta(&s.id, "r", t)).collect();
        let logged = store.append_events(batch).await.unwrap();
        assert!(proxy.sprung(), "{trap:?}: the commit's connection was lost");
        let seqs: Vec<u64> = logged.iter().map(|e| e.seq()).collect();
        let first = expected.len() as u64 + 1;
        assert_eq!(seqs, (first..first + 3).collect::<Vec<_>>(), "{trap:?}");
        expected.extend(texts);
    }
    let stored = store.read_events(&s.id, 0, 100).await.unwrap();
    let texts: Vec<String> = stored
        .iter()
        .map(|e| match &e.event.kind {
            agentd_core::event::EventKind::TextDelta { delta } => delta.clone(),
            other => other.type_name().to_string(),
        })
        .collect();
    assert_eq!(texts, expected, "every event once, in order");
    let seqs: Vec<u64> = stored.iter().map(|e| e.seq()).collect();
    assert_eq!(seqs, (1..=expected.len() as u64).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_database_that_cannot_be_reached_is_unavailable_not_an_error() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let (proxy, url) = Proxy::in_front_of(db.url()).await;
    let store = PgStore::open(&url, 2).await.unwrap();
    let s = new_session(&store, "alice").await;
    proxy.cut();
    let got = store.get_session(&s.id).await;
    assert!(matches!(got, Err(StoreError::Unavailable(_))), "{got:?}");
    let listed = store.list_runs(&s.id).await;
    assert!(
        matches!(listed, Err(StoreError::Unavailable(_))),
        "{listed:?}"
    );
    proxy.restore();
    // A real error is still one.
    let dup = store.create_session(&s).await;
    assert!(matches!(dup, Err(StoreError::Conflict(_))), "{dup:?}");
    assert!(store.get_session(&s.id).await.unwrap().is_some());
}

/// Fencing (SPEC.md section 6): once another node has expelled a node whose lease lapsed, every append and
/// renewal of that node is refused (`Fenced`), and nothing of its batch reaches the log; a node that renews
/// in time is never expelled, and the next process under the same node id joins afresh.
#[tokio::test]
async fn an_expelled_node_can_append_nothing() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let a = PgStore::open(db.url(), 2).await.unwrap();
    let b = PgStore::open(db.url(), 2).await.unwrap();
    let beat = |node: &str, instance: &str| agentd_core::store::NodeBeat {
        node_id: node.into(),
        instance: instance.into(),
        listen: "127.0.0.1:1".into(),
        started_at: "t".into(),
    };
    a.heartbeat(&beat("a", "a1")).await.unwrap();
    b.heartbeat(&beat("b", "b1")).await.unwrap();
    let s = new_session(&a, "alice").await;
    a.append_events(vec![delta(&s.id, "r", "one")])
        .await
        .unwrap();
    // Within its lease a is kept: b's sweep expels nobody, and a renews.
    b.expel_lapsed(std::time::Duration::from_secs(10))
        .await
        .unwrap();
    a.heartbeat(&beat("a", "a1")).await.unwrap();
    assert!(!a.fenced().unwrap().is_cancelled());
    // a's lease lapses (a lease of 0 s: every beat is old), b expels it: from then on a writes nothing.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    b.heartbeat(&beat("b", "b1")).await.unwrap();
    b.expel_lapsed(std::time::Duration::from_millis(10))
        .await
        .unwrap();
    let refused = a.append_events(vec![delta(&s.id, "r", "two")]).await;
    assert!(matches!(refused, Err(StoreError::Fenced(_))), "{refused:?}");
    assert!(a.fenced().unwrap().is_cancelled(), "the process is told");
    assert!(matches!(
        a.heartbeat(&beat("a", "a1")).await,
        Err(StoreError::Fenced(_))
    ));
    // A process that joins after the expulsion writes.
    let b2 = PgStore::open(db.url(), 1).await.unwrap();
    b2.heartbeat(&beat("b", "b2")).await.unwrap();
    b2.append_events(vec![delta(&s.id, "r", "three")])
        .await
        .unwrap();
    let stored: Vec<String> = b2
        .read_events(&s.id, 0, 10)
        .await
        .unwrap()
        .iter()
        .map(|e| match &e.event.kind {
            agentd_core::event::EventKind::TextDelta { delta } => delta.clone(),
            other => other.type_name().to_string(),
        })
        .collect();
    assert_eq!(stored, ["one", "three"], "nothing of the fenced append");
    // A new process under a's node id joins afresh and writes again.
    let a2 = PgStore::open(db.url(), 1).await.unwrap();
    a2.heartbeat(&beat("a", "a2")).await.unwrap();
    a2.append_events(vec![delta(&s.id, "r", "four")])
        .await
        .unwrap();
    // A node that sweeps never expels itself, however late its own renewal (it is alive: it sweeps).
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    a2.expel_lapsed(std::time::Duration::from_millis(10))
        .await
        .unwrap();
    a2.heartbeat(&beat("a", "a2")).await.unwrap();
    a2.append_events(vec![delta(&s.id, "r", "five")])
        .await
        .unwrap();
    assert!(!a2.fenced().unwrap().is_cancelled());
}

/// Claims (SPEC.md section 6): a lost node's runs go to one node only, even when that node restarts while
/// another sweeps; a session's unfinished runs move together.
#[tokio::test]
async fn a_lost_nodes_runs_are_claimed_once_and_a_sessions_runs_move_together() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = PgStore::open(db.url(), 2).await.unwrap();
    let beat = |node: &str, instance: &str| agentd_core::store::NodeBeat {
        node_id: node.into(),
        instance: instance.into(),
        listen: "127.0.0.1:1".into(),
        started_at: "t".into(),
    };
    let lease = std::time::Duration::from_secs(10);
    let s = new_session(&store, "alice").await;
    let mut runs = Vec::new();
    for _ in 0..2 {
        let mut run = Run::queued(&s.id);
        run.node = Some("n1".into());
        store.create_run(&run, None).await.unwrap();
        runs.push(run.id);
    }
    // n1 is not in the registry (it died): n2 takes the first run, and the second comes along.
    let n2 = PgStore::open(db.url(), 1).await.unwrap();
    n2.heartbeat(&beat("n2", "i2")).await.unwrap();
    assert!(n2
        .claim_run(&s.id, &runs[0], Some("n1"), "n2", lease)
        .await
        .unwrap());
    assert!(
        n2.claim_run(&s.id, &runs[1], Some("n1"), "n2", lease)
            .await
            .unwrap(),
        "moved with the first"
    );
    // n1 restarts: the runs are n2's now, its claim of its own previous runs fails.
    let n1 = PgStore::open(db.url(), 1).await.unwrap();
    n1.heartbeat(&beat("n1", "i1b")).await.unwrap();
    assert!(!n1
        .claim_run(&s.id, &runs[0], Some("n1"), "n1", lease)
        .await
        .unwrap());
    // The other order: runs of n3, which restarts and claims them before n2 sweeps: n2's claim fails, since
    // n3 is live again.
    let s3 = new_session(&store, "alice").await;
    let mut run = Run::queued(&s3.id);
    run.node = Some("n3".into());
    store.create_run(&run, None).await.unwrap();
    let n3 = PgStore::open(db.url(), 1).await.unwrap();
    n3.heartbeat(&beat("n3", "i3b")).await.unwrap();
    assert!(n3
        .claim_run(&s3.id, &run.id, Some("n3"), "n3", lease)
        .await
        .unwrap());
    assert!(!n2
        .claim_run(&s3.id, &run.id, Some("n3"), "n2", lease)
        .await
        .unwrap());
    assert_eq!(
        store.get_run(&s3.id, &run.id).await.unwrap().unwrap().node,
        Some("n3".into())
    );
}

/// Run control across nodes looks for a session's unfinished runs; the query finds them through their partial
/// index by session (whatever it then sorts is those few), so its cost grows neither with the runs the session
/// has finished nor with the other sessions' turns under way.
#[tokio::test]
async fn a_sessions_unfinished_runs_are_read_through_their_own_index() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = PgStore::open(db.url(), 1).await.unwrap();
    // Many sessions, each with a turn under way and one finished (the index of every unfinished run would
    // visit all of theirs), and one with a longer history.
    for _ in 0..300 {
        let other = new_session(&store, "bob").await;
        let mut done = Run::queued(&other.id);
        done.status = agentd_core::domain::RunStatus::Completed;
        store.create_run(&done, None).await.unwrap();
        store
            .create_run(&Run::queued(&other.id), None)
            .await
            .unwrap();
    }
    let s = new_session(&store, "alice").await;
    for _ in 0..20 {
        let mut run = Run::queued(&s.id);
        run.status = agentd_core::domain::RunStatus::Completed;
        store.create_run(&run, None).await.unwrap();
    }
    let open = Run::queued(&s.id);
    store.create_run(&open, None).await.unwrap();
    assert_eq!(
        store.unfinished_runs(Some(&s.id)).await.unwrap(),
        vec![open]
    );

    let client = raw(&db).await;
    client
        .batch_execute("ANALYZE runs; SET enable_seqscan = off")
        .await
        .unwrap();
    let sql = agentd_postgres::UNFINISHED_RUNS_OF.replace("$1", &format!("'{}'", s.id));
    let plan: Vec<String> = client
        .query(&format!("EXPLAIN {sql}"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        plan.iter()
            .any(|l| l.contains("runs_unfinished_by_session")),
        "{plan:#?}"
    );
    assert!(
        plan.iter().any(|l| l.contains("Index Cond: (session_id =")),
        "{plan:#?}"
    );
}
