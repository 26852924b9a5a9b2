//! The pool's admission, deadlines and timeouts, on sessions that sleep.

use std::sync::atomic::AtomicBool;

use super::*;

fn pool(sessions: usize, queue_depth: usize, call_timeout: Duration) -> Arc<Pool<()>> {
    let settings = PoolSettings {
        name: "test-pool",
        queue_depth,
        call_timeout,
        max_replacements: sessions,
        ekm: "test".into(),
    };
    let metrics = Metrics::new(Duration::from_millis(100));
    Arc::new(Pool::start(&settings, vec![(); sessions], || (), metrics).unwrap())
}

fn sleeper(d: Duration) -> impl FnOnce(&mut ()) -> Result<(), HsmError> + Send {
    move |()| {
        std::thread::sleep(d);
        Ok(())
    }
}

/// Occupies the only session for `d`; returns once the call has started.
async fn occupy(pool: &Arc<Pool<()>>, d: Duration) -> tokio::task::JoinHandle<()> {
    let started = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&started);
    let pool = Arc::clone(pool);
    let task = tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(10);
        let _ = pool
            .run(Call::Encrypt, deadline, move |()| {
                flag.store(true, Ordering::SeqCst);
                std::thread::sleep(d);
                Ok(())
            })
            .await;
    });
    while !started.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    task
}

#[tokio::test]
async fn a_request_that_expires_while_queued_never_reaches_the_hsm() {
    let pool = pool(1, 8, Duration::from_secs(10));
    let busy = occupy(&pool, Duration::from_millis(300)).await;
    let ran = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&ran);
    let deadline = Instant::now() + Duration::from_millis(50);
    let result = pool
        .run(Call::Encrypt, deadline, move |()| {
            flag.store(true, Ordering::SeqCst);
            Ok(())
        })
        .await;
    assert_eq!(result, Err(HsmError::Busy(ShedReason::ExpiredInQueue)));
    busy.await.unwrap();
    // The session is free now; the expired job was skipped, not run late. The pool
    // has learned that a call takes 300 ms, and the two places ahead may not be
    // given back yet (that happens just after the answer): up to three waves,
    // 900 ms, must fit the deadline, or admission refuses this call.
    pool.run(
        Call::Encrypt,
        Instant::now() + Duration::from_secs(5),
        sleeper(Duration::ZERO),
    )
    .await
    .unwrap();
    assert!(!ran.load(Ordering::SeqCst));
    // The worker gives the place back just after it sends the answer.
    let give_up = Instant::now() + Duration::from_secs(5);
    while pool.shared.outstanding.load(Ordering::SeqCst) != 0 {
        assert!(Instant::now() < give_up, "a place was never given back");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test]
async fn a_full_queue_and_a_hopeless_wait_are_refused_at_once() {
    let pool = pool(1, 1, Duration::from_secs(10));
    // Teach the pool that a call takes about 100 ms.
    pool.run(
        Call::Encrypt,
        Instant::now() + Duration::from_secs(1),
        sleeper(Duration::from_millis(100)),
    )
    .await
    .unwrap();
    let busy = occupy(&pool, Duration::from_millis(200)).await;
    // One wave ahead + our own call ≈ 200 ms: hopeless within 150 ms.
    let before = Instant::now();
    let result = pool
        .run(
            Call::Encrypt,
            before + Duration::from_millis(150),
            sleeper(Duration::ZERO),
        )
        .await;
    assert_eq!(result, Err(HsmError::Busy(ShedReason::ExpectedWait)));
    assert!(
        before.elapsed() < Duration::from_millis(100),
        "not refused at once"
    );
    // Fill the one queue place; the next request finds the queue full.
    let queued = {
        let pool = Arc::clone(&pool);
        tokio::spawn(async move {
            pool.run(
                Call::Encrypt,
                Instant::now() + Duration::from_secs(5),
                sleeper(Duration::ZERO),
            )
            .await
        })
    };
    while pool.shared.outstanding.load(Ordering::SeqCst) < 2 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let result = pool
        .run(
            Call::Encrypt,
            Instant::now() + Duration::from_secs(5),
            sleeper(Duration::ZERO),
        )
        .await;
    assert_eq!(result, Err(HsmError::Busy(ShedReason::QueueFull)));
    busy.await.unwrap();
    queued.await.unwrap().unwrap();
}

/// Sends `count` requests of `each` at once with `budget` to spare, and returns how
/// many were refused.
async fn burst(pool: &Arc<Pool<()>>, count: usize, each: Duration, budget: Duration) -> usize {
    let deadline = Instant::now() + budget;
    let calls: Vec<_> = (0..count)
        .map(|_| {
            let pool = Arc::clone(pool);
            tokio::spawn(async move { pool.run(Call::Encrypt, deadline, sleeper(each)).await })
        })
        .collect();
    let mut refused = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(()) => {}
            Err(HsmError::Busy(_)) => refused += 1,
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    refused
}

#[test]
fn one_outlier_moves_the_estimate_a_little_and_a_slowdown_a_lot() {
    assert_eq!(next_estimate(0, 5_000), 5_000);
    // 8 µs steady, then one 10 ms stall: it counts as 32 µs.
    assert_eq!(next_estimate(8_000, 10_000_000), 7_000 + 4_000);
    // A call as fast as the mean keeps it.
    assert_eq!(next_estimate(8_000, 8_000), 8_000);
    // An HSM that became 250 times slower is followed within 20 calls.
    let mut estimate = 20_000;
    for _ in 0..20 {
        estimate = next_estimate(estimate, 5_000_000);
    }
    assert!(estimate > 2_500_000, "{estimate}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_stalled_call_does_not_shut_the_queue_out() {
    let pool = pool(1, 64, Duration::from_secs(10));
    let quick = Duration::from_millis(1);
    for _ in 0..16 {
        pool.run(
            Call::Encrypt,
            Instant::now() + Duration::from_secs(1),
            sleeper(quick),
        )
        .await
        .unwrap();
    }
    // One call stalls for longer than a request's whole budget.
    pool.run(
        Call::Encrypt,
        Instant::now() + Duration::from_secs(5),
        sleeper(Duration::from_millis(600)),
    )
    .await
    .unwrap();
    // Twenty 1 ms requests fit easily in 500 ms. Had the stall counted in full
    // (a mean of 76 ms), everyone with five or more ahead would be refused.
    let refused = burst(&pool, 20, quick, Duration::from_millis(500)).await;
    assert_eq!(refused, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_calls_do_not_teach_the_estimate() {
    let pool = pool(1, 64, Duration::from_secs(10));
    // A first health check that logs in and copies keys: slow, and not what
    // requests will take.
    pool.run(
        Call::HealthCheck,
        Instant::now() + Duration::from_secs(5),
        sleeper(Duration::from_millis(600)),
    )
    .await
    .unwrap();
    assert_eq!(pool.shared.mean_service(), Duration::ZERO);
    let refused = burst(
        &pool,
        20,
        Duration::from_millis(1),
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(refused, 0);
    // Requests do teach it.
    assert!(pool.shared.mean_service() >= Duration::from_millis(1));
}

fn shed(pool: &Pool<()>, reason: &'static str) -> u64 {
    pool.shared
        .metrics
        .sheds
        .get_or_create(&crate::metrics::ShedLabels { reason })
        .get()
}

#[tokio::test]
async fn a_deadline_that_passes_early_in_a_call_is_load_not_a_hung_hsm() {
    // One session: the request waits 300 ms for another call, then runs its own
    // for the 100 ms it has left (of 400); the call timeout is far away. The
    // margins leave a loaded machine 100 ms of scheduling delay.
    let pool = pool(1, 8, Duration::from_secs(5));
    let first = {
        let pool = Arc::clone(&pool);
        let deadline = Instant::now() + Duration::from_secs(10);
        // A control call, so that the service-time estimate stays empty and the
        // request below is not shed before its call for lack of time.
        tokio::spawn(async move {
            pool.run(
                Call::HealthCheck,
                deadline,
                sleeper(Duration::from_millis(300)),
            )
            .await
        })
    };
    // A request with 400 ms left whose call would take 600 ms.
    let slow_request = || {
        pool.run(
            Call::HealthCheck,
            Instant::now() + Duration::from_millis(400),
            sleeper(Duration::from_millis(600)),
        )
    };
    while pool.shared.busy.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let result = slow_request().await;
    first.await.unwrap().unwrap();
    assert_eq!(result, Err(HsmError::Busy(ShedReason::ExpiredInCall)));
    assert_eq!(shed(&pool, "expired_in_call"), 1);

    // A call that takes the request's whole time is the HSM's: a timeout. (Once
    // the session has finished the call given up above.)
    while pool.shared.busy.load(Ordering::SeqCst) != 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(slow_request().await, Err(HsmError::Timeout));
    assert_eq!(shed(&pool, "expired_in_call"), 1);
}

#[tokio::test]
async fn a_call_past_its_timeout_answers_at_once_and_keeps_its_session() {
    let pool = pool(2, 8, Duration::from_millis(50));
    let before = Instant::now();
    let result = pool
        .run(
            Call::Encrypt,
            before + Duration::from_secs(5),
            sleeper(Duration::from_millis(400)),
        )
        .await;
    assert_eq!(result, Err(HsmError::Timeout));
    assert!(before.elapsed() < Duration::from_millis(300));
    assert_eq!(
        pool.shared.busy.load(Ordering::SeqCst),
        1,
        "session still in the call"
    );
    // The other session serves.
    pool.run(
        Call::Encrypt,
        Instant::now() + Duration::from_secs(1),
        sleeper(Duration::ZERO),
    )
    .await
    .unwrap();
}

/// A call that holds its thread until `held`'s sender is dropped.
fn held_until_released(
    held: crossbeam_channel::Receiver<()>,
) -> impl FnOnce(&mut ()) -> Result<(), HsmError> + Send {
    move |()| {
        let _ = held.recv();
        Ok(())
    }
}

/// Waits (up to 10 s) until the pool's threads are `expected`.
async fn threads_become(pool: &Pool<()>, expected: PoolThreads) {
    let give_up = Instant::now() + Duration::from_secs(10);
    while pool.threads() != expected {
        assert!(Instant::now() < give_up, "{:?}", pool.threads());
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_call_is_replaced_within_the_bound_and_its_thread_retires_when_it_returns() {
    // One session, one replacement at most.
    let pool = pool(1, 8, Duration::from_millis(50));
    // Calls that hold their thread until the sender is dropped.
    let (release, held) = crossbeam_channel::bounded::<()>(0);
    let hold = || held_until_released(held.clone());
    let deadline = || Instant::now() + Duration::from_secs(5);
    let threads = |threads, stuck| PoolThreads {
        sessions: 1,
        threads,
        stuck,
    };

    assert_eq!(
        pool.run(Call::Encrypt, deadline(), hold()).await,
        Err(HsmError::Timeout)
    );
    threads_become(&pool, threads(2, 1)).await;
    assert_eq!(pool.shared.stuck_gauge.get(), 1);
    // The replacement serves.
    pool.run(Call::Encrypt, deadline(), sleeper(Duration::ZERO))
        .await
        .unwrap();

    // It gets stuck too: the bound allows no third thread, and nothing serves.
    assert_eq!(
        pool.run(Call::Encrypt, deadline(), hold()).await,
        Err(HsmError::Timeout)
    );
    threads_become(&pool, threads(2, 2)).await;
    let ran = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&ran);
    let result = pool
        .run(Call::Encrypt, deadline(), move |()| {
            flag.store(true, Ordering::SeqCst);
            Ok(())
        })
        .await;
    assert_eq!(result, Err(HsmError::Timeout));
    assert!(
        !ran.load(Ordering::SeqCst),
        "sent to a pool with no thread serving"
    );

    // The calls return: one thread rejoins, the other retires.
    drop(release);
    threads_become(&pool, threads(1, 0)).await;
    assert_eq!(pool.shared.stuck_gauge.get(), 0);
    pool.run(Call::Encrypt, deadline(), sleeper(Duration::ZERO))
        .await
        .unwrap();
}
