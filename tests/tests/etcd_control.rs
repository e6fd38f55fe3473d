//! The gateway's etcd client and its controller election, against real etcd members:
//! reads, compare-and-swap, leases, members that are down or hang, one controller at a
//! time, and epochs that are never handed out twice.

use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway::config::EtcdConfig;
use gateway::election::{ControlError, Election};
use gateway::etcd::{Compare, EtcdClient, EtcdError, Op};
use system_tests::etcd::EtcdCluster;
use system_tests::free_port;
use system_tests::gateway::Blackhole;
use system_tests::poll::eventually;

const TIMEOUT: Duration = Duration::from_millis(500);
const MARGIN: Duration = Duration::from_millis(50);

fn client(endpoints: Vec<String>) -> EtcdClient {
    EtcdClient::new(endpoints, TIMEOUT).expect("etcd client")
}

fn config(endpoints: Vec<String>, prefix: &str) -> EtcdConfig {
    EtcdConfig {
        endpoints,
        prefix: prefix.to_string(),
        lease_ttl: Duration::from_secs(1),
        timeout: TIMEOUT,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reads_writes_and_compares_and_swaps() {
    // Given one etcd member
    let etcd = EtcdCluster::start_one().await;
    let c = client(etcd.client_urls());

    // When a key is created only if absent, twice
    let absent = Compare::Created {
        key: "/t/k".into(),
        revision: 0,
    };
    let put = |v: &str| Op::Put {
        key: "/t/k".into(),
        value: v.as_bytes().to_vec(),
        lease: 0,
    };
    let get = Op::Get { key: "/t/k".into() };
    assert_eq!(c.get("/t/k").await.unwrap(), None);
    let absent = std::slice::from_ref(&absent);
    let get = std::slice::from_ref(&get);
    let first = c.txn(absent, &[put("one")], get).await.unwrap();
    let second = c.txn(absent, &[put("two")], get).await.unwrap();

    // Then only the first wins, and the loser reads what the winner wrote
    assert!(first.succeeded);
    assert!(!second.succeeded);
    let kv = second.gets[0].clone().expect("the key");
    assert_eq!(kv.value, b"one");
    assert_eq!(kv.create_revision, first.revision);

    // And a swap on the key's mod revision succeeds once, then fails as stale
    let at = |rev| Compare::Modified {
        key: "/t/k".into(),
        revision: rev,
    };
    let swapped = c
        .txn(&[at(kv.mod_revision)], &[put("three")], &[])
        .await
        .unwrap();
    let stale = c
        .txn(&[at(kv.mod_revision)], &[put("four")], &[])
        .await
        .unwrap();
    assert!(swapped.succeeded && !stale.succeeded);
    assert_eq!(c.get("/t/k").await.unwrap().unwrap().value, b"three");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_on_a_lease_lives_while_kept_alive_and_goes_when_revoked_or_expired() {
    let etcd = EtcdCluster::start_one().await;
    let c = client(etcd.client_urls());

    // Given a key attached to a 1 s lease
    let lease = c.grant(Duration::from_secs(1)).await.unwrap();
    assert_eq!(lease.ttl, Duration::from_secs(1), "etcd kept the 1 s TTL");
    let put = Op::Put {
        key: "/t/leased".into(),
        value: b"x".to_vec(),
        lease: lease.id,
    };
    assert!(c.txn(&[], &[put], &[]).await.unwrap().succeeded);

    // When it is kept alive for 2.5 s, the key stays
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(2500) {
        let r = c.keep_alive(lease.id).await.unwrap();
        assert!(r.ttl.is_some());
        assert!(c.get("/t/leased").await.unwrap().is_some());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // When keep-alives stop, the key goes within the TTL plus etcd's 0.5 s expiry scan
    let stopped = Instant::now();
    eventually(Duration::from_secs(5), "leased key deleted", || async {
        match c.get("/t/leased").await.unwrap() {
            None => Ok(()),
            Some(kv) => Err(kv),
        }
    })
    .await;
    let gone = stopped.elapsed();
    assert!(gone >= Duration::from_millis(700), "expired after {gone:?}");
    assert!(gone < Duration::from_millis(2500), "expired after {gone:?}");
    // And the expired lease can no longer be renewed
    assert!(c.keep_alive(lease.id).await.unwrap().ttl.is_none());

    // And a revoked lease takes its key with it at once; revoking twice is fine
    let lease = c.grant(Duration::from_secs(5)).await.unwrap();
    let put = Op::Put {
        key: "/t/revoked".into(),
        value: b"x".to_vec(),
        lease: lease.id,
    };
    assert!(c.txn(&[], &[put], &[]).await.unwrap().succeeded);
    c.revoke(lease.id).await.unwrap();
    c.revoke(lease.id).await.unwrap();
    assert_eq!(c.get("/t/revoked").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_goes_past_a_dead_member_and_a_hung_one() {
    // Given a three-member cluster, and a client whose first endpoint refuses
    // connections and whose second hangs (a blackhole in front of member 0)
    let etcd = EtcdCluster::start(3).await;
    let hung = Blackhole::start(etcd.members[0].client_port()).await;
    hung.cut(true);
    let dead = format!("http://127.0.0.1:{}", free_port());
    let urls = etcd.client_urls();
    let c = client(vec![dead.clone(), hung.url(), urls[1].clone()]);

    // When it writes and reads
    let started = Instant::now();
    let put = Op::Put {
        key: "/t/m".into(),
        value: b"v".to_vec(),
        lease: 0,
    };
    assert!(c.txn(&[], &[put], &[]).await.unwrap().succeeded);
    let first_call = started.elapsed();

    // Then the call succeeds through the live member, having waited once for the hung
    // one; later calls go straight to the member that answered
    assert!(first_call < TIMEOUT * 3, "took {first_call:?}");
    let again = Instant::now();
    assert_eq!(c.get("/t/m").await.unwrap().unwrap().value, b"v");
    assert!(again.elapsed() < TIMEOUT, "took {:?}", again.elapsed());

    // And with no endpoint answering, a call fails within one timeout per endpoint
    let none = client(vec![dead, hung.url()]);
    let t = Instant::now();
    let err = none.get("/t/m").await.unwrap_err();
    assert!(matches!(err, EtcdError::Unavailable(_)), "{err}");
    assert!(
        t.elapsed() < TIMEOUT * 2 + Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );
}

/// An election and its campaign task.
struct Candidate {
    election: Arc<Election>,
    task: tokio::task::JoinHandle<()>,
}

impl Candidate {
    fn start(id: &str, endpoints: Vec<String>, prefix: &str) -> Candidate {
        let election =
            Arc::new(Election::new(id, MARGIN, &config(endpoints, prefix)).expect("election"));
        let task = tokio::spawn(election.clone().run());
        Candidate { election, task }
    }
}

impl Drop for Candidate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn wait_in_control(c: &Candidate, deadline: Duration) -> Instant {
    eventually(
        deadline,
        &format!("{} in control", c.election.id()),
        || async {
            if c.election.may_act() {
                Ok(Instant::now())
            } else {
                Err(c.election.holder())
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_controller_at_a_time_and_its_epochs_are_never_handed_out_twice() {
    // Given two gateways campaigning on a three-member cluster
    let etcd = EtcdCluster::start(3).await;
    let g1 = Candidate::start("g1", etcd.client_urls(), "/one");
    wait_in_control(&g1, Duration::from_secs(10)).await;
    let g2 = Candidate::start("g2", etcd.client_urls(), "/one");

    // Then only g1 controls, and g2 knows it
    eventually(Duration::from_secs(5), "g2 sees g1", || async {
        match g2.election.holder() {
            Some(h) if h == "g1" => Ok(()),
            other => Err(other),
        }
    })
    .await;
    assert!(!g2.election.may_act());

    // And only the controller allocates epochs, each above the last and above what it
    // has seen
    assert!(matches!(
        g2.election.allocate(0, "a").await,
        Err(ControlError::NotController)
    ));
    assert_eq!(g1.election.allocate(0, "a").await.unwrap(), 1);
    assert_eq!(g1.election.allocate(0, "b").await.unwrap(), 2);
    assert_eq!(g1.election.allocate(6, "a").await.unwrap(), 7);
    let record = g1.election.record().await.unwrap().unwrap();
    assert_eq!(
        (record.epoch, record.region.as_str(), record.leased),
        (7, "a", false)
    );
    g1.election.mark_leased(7).await;
    assert!(g1.election.record().await.unwrap().unwrap().leased);

    // When g1 dies without a word (its keep-alives stop)
    let until = g1.election.held_until().expect("g1 holds a term");
    let died = Instant::now();
    drop(g1);

    // Then g2 takes control, but never before g1's control surely ended
    let took = wait_in_control(&g2, Duration::from_secs(5)).await;
    assert!(
        took >= until,
        "g2 took control {:?} before g1's ended",
        until - took
    );
    eprintln!("[election] g2 in control {:?} after g1 died", took - died);
    assert!(took - died < Duration::from_millis(2500));

    // And the epochs continue above g1's
    assert_eq!(g2.election.allocate(0, "b").await.unwrap(), 8);

    // When g2 resigns (SIGTERM), a third gateway takes over within its poll
    let g3 = Candidate::start("g3", etcd.client_urls(), "/one");
    eventually(Duration::from_secs(5), "g3 sees g2", || async {
        match g3.election.holder() {
            Some(h) if h == "g2" => Ok(()),
            other => Err(other),
        }
    })
    .await;
    let resigned = Instant::now();
    g2.election.resign().await;
    assert!(!g2.election.may_act());
    let took = wait_in_control(&g3, Duration::from_secs(5)).await;
    assert!(
        took - resigned < Duration::from_millis(800),
        "{:?}",
        took - resigned
    );
    assert_eq!(g3.election.allocate(0, "a").await.unwrap(), 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_cut_off_from_etcd_stops_acting_before_another_takes_over() {
    // Given g1 reaching etcd only through a proxy that can go silent, g2 directly
    let etcd = EtcdCluster::start_one().await;
    let proxy = Blackhole::start(etcd.members[0].client_port()).await;
    let g1 = Candidate::start("g1", vec![proxy.url()], "/cut");
    wait_in_control(&g1, Duration::from_secs(10)).await;
    let g2 = Candidate::start("g2", etcd.client_urls(), "/cut");
    assert_eq!(g1.election.allocate(0, "a").await.unwrap(), 1);

    // When g1's link to etcd goes silent
    proxy.cut(true);
    let cut = Instant::now();

    // Then g1 stops acting, and only after that does g2 take control
    let stopped = eventually(Duration::from_secs(5), "g1 stops acting", || async {
        if g1.election.may_act() {
            Err(())
        } else {
            Ok(Instant::now())
        }
    })
    .await;
    let took = wait_in_control(&g2, Duration::from_secs(5)).await;
    assert!(took > stopped, "g2 took control before g1 stopped");
    assert!(g1.election.held_until().unwrap() <= took);
    eprintln!(
        "[election] g1 stopped {:?} after the cut, g2 in control {:?} after it",
        stopped - cut,
        took - cut
    );
    assert!(matches!(
        g1.election.allocate(0, "b").await,
        Err(ControlError::NotController)
    ));

    // And when the link heals, g1 learns it lost and does not come back
    proxy.cut(false);
    eventually(Duration::from_secs(5), "g1 sees g2", || async {
        match g1.election.holder() {
            Some(h) if h == "g2" => Ok(()),
            other => Err(other),
        }
    })
    .await;
    assert!(!g1.election.may_act());
    assert_eq!(g2.election.allocate(0, "b").await.unwrap(), 2);
}
