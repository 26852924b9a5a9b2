//! The service manager's notify protocol (`sd_notify(3)`), for `Type=notify` units
//! (`deploy/systemd/xks-proxy.service`): the proxy says READY=1 once its health check
//! has found an EKM able to serve, STOPPING=1 when draining starts, and, when the unit
//! sets `WatchdogSec=`, WATCHDOG=1 at half that interval.
//!
//! The messages are datagrams to the socket named by `NOTIFY_SOCKET`, which the
//! `sd-notify` crate sends; without that variable (not started by systemd) every
//! function here does nothing. A failed send is logged, never fatal: the service
//! manager's view must not decide whether KMS is served.

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;

use crate::health::HealthMonitor;

fn notify(states: &[NotifyState<'_>]) {
    // `false`: keep NOTIFY_SOCKET; STOPPING=1 and the watchdog need it later.
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// Waits for the first health check that finds an EKM able to serve, then tells the
/// service manager READY=1. Until then the listeners are open (requests get the
/// spec's errors, the readiness probe says no) and `systemctl start` waits: with
/// `Restart=on-failure`, an HSM that stays away past `TimeoutStartSec=` gets the
/// proxy restarted, and a returning one gets it ready within the monitor's
/// one-second re-check.
pub async fn ready_when_serving(monitor: Arc<HealthMonitor>) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    notify(&[NotifyState::Status(
        "waiting for an EKM to pass the health check",
    )]);
    monitor.first_served().await;
    tracing::info!("telling the service manager we are ready");
    notify(&[NotifyState::Ready, NotifyState::Status("serving")]);
}

/// Tells the service manager that the proxy is draining and will exit.
pub fn stopping() {
    notify(&[
        NotifyState::Stopping,
        NotifyState::Status("draining in-flight requests"),
    ]);
}

/// The watchdog interval the service manager asked for (`WATCHDOG_USEC`, for this
/// process per `WATCHDOG_PID`), if any.
pub fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0;
    (sd_notify::watchdog_enabled(false, &mut usec) && usec > 0).then(|| Duration::from_micros(usec))
}

/// Sends WATCHDOG=1 every half `interval`, forever. It runs as an ordinary task on
/// the tokio runtime that serves KMS, so the pings stop, and systemd restarts the
/// proxy, when the runtime stops running tasks (every worker blocked or deadlocked).
/// An HSM outage does not stop them: a restart would not bring the HSM back, and the
/// health check reports it.
pub async fn watchdog(interval: Duration) {
    let mut ticker = tokio::time::interval(interval / 2);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        notify(&[NotifyState::Watchdog]);
    }
}
