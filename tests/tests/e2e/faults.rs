//! End-to-end faults (docs/design.md section 9, layer 5): the controller killed with
//! SIGKILL in the middle of payments, a gateway reboot that loses the pinned maps,
//! and the client agent killed with SIGKILL in the middle of its session.

// Test code: unwrap is how a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bitcoin::Amount;
use bitmesh_channel::sign_update;
use bitmesh_client::state::{SignedState, StateDir};
use bitmesh_common::pricing::{bytes_for_payment, payment_for_bytes, ByteCount, PriceMsatPerMib};
use bitmesh_tests::client::{Agent, AgentOpts};
use bitmesh_tests::controller::ControllerOpts;
use bitmesh_tests::env::wait_until;
use bitmesh_tests::testbed::Testbed;
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn n(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {v}"))
}

/// What the client's state file says it signed last, and whether the gateway
/// acknowledged it.
fn signed(agent: &Agent) -> (u64, bool) {
    let s = agent.state().unwrap();
    (n(&s["latest"], "total_paid_sat"), s["latest"]["acked"].as_bool().unwrap())
}

#[test]
fn controller_killed_during_payments_keeps_every_acknowledged_payment_and_credits_none_twice() {
    const CLIENTS: usize = 4;
    let Some(world) = Testbed::start(CLIENTS).unwrap() else { return };
    let funding = world.fund(CLIENTS, Amount::from_sat(100_000)).unwrap();
    // Default limits, the per-IP rate limit included: an agent that lost its event
    // stream must wait and reconnect, not poll its way into `rate_limited`.
    let opts = ControllerOpts::story();
    let price = PriceMsatPerMib::new(opts.price_msat_per_mib.unwrap()).unwrap();
    let ctl = world.start_controller(&opts).unwrap();
    let mut agents: Vec<Agent> = (0..CLIENTS)
        .map(|i| world.start_agent(i, &AgentOpts::new(funding[i].file.clone(), 30_000)).unwrap())
        .collect();
    for a in &mut agents {
        a.wait_for("channel funded", Duration::from_secs(60)).unwrap();
    }
    // Unconfirmed channels get at most the first payment + one chunk: confirm them.
    world.mine(1);

    // Every client downloads 10 MiB at 1 MiB/s, paying as it goes; 3 s in, the
    // controller is killed with SIGKILL and comes back 2 s later.
    let (fetches, acked_at_kill, ctl) = std::thread::scope(|s| {
        let world = &world;
        let handles: Vec<_> = (0..CLIENTS)
            .map(|i| s.spawn(move || world.fetch_paced(i, 10 * MIB, MIB, Duration::from_secs(30))))
            .collect();
        std::thread::sleep(Duration::from_secs(3));
        // What every client holds as acknowledged, read just before the kill (so it was
        // acknowledged before it). A send takes milliseconds: wait for a moment when no
        // agent has one in flight, then kill at once; payments keep flowing meanwhile.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        let acked: Vec<Option<u64>> = loop {
            let states: Vec<(u64, bool)> = agents.iter().map(signed).collect();
            if states.iter().all(|s| s.1) || std::time::Instant::now() > deadline {
                break states.iter().map(|s| Some(s.0).filter(|_| s.1)).collect();
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        ctl.crash();
        std::thread::sleep(Duration::from_secs(2));
        let ctl = world.start_controller(&opts).unwrap();
        let fetches: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        (fetches, acked, ctl)
    });
    assert!(acked_at_kill.iter().all(Option::is_some), "payments were flowing at the kill: {acked_at_kill:?}");
    for (i, f) in fetches.iter().enumerate() {
        assert!(f.complete, "client {i} did not carry on after the restart: {f:?}\nagent:\n{}", agents[i].output());
    }
    let log = std::fs::read_to_string(ctl.log_path()).unwrap();
    assert!(
        log.contains("kernel maps reconciled with the store pinned=true"),
        "the restart took the pinned maps over:\n{}",
        ctl.log_tail(40)
    );

    // Let in-flight top-ups land, then compare the journal, the kernel and the clients
    // on a quiet snapshot: the same channel row before and after reading the agent and
    // the kernel (an agent may still be topping up after the restart).
    for (i, a) in agents.iter().enumerate() {
        let mac = &world.lan.clients[i].mac;
        let (ch, (latest, latest_acked), row) = wait_until(&format!("client {i}: a quiet snapshot"), Duration::from_secs(30), || {
            let ch = ctl.channel(mac)?;
            let (latest, acked) = signed(a);
            let row = ctl.client(mac)?;
            let again = ctl.channel(mac)?;
            let quiet = n(&ch, "paid_sat") == n(&again, "paid_sat") && (!acked || n(&ch, "paid_sat") == latest);
            quiet.then_some((ch, (latest, acked), row))
        });
        let paid = n(&ch, "paid_sat");
        assert!(paid >= acked_at_kill[i].unwrap(), "client {i}: an acknowledged payment was lost: {ch}");
        assert!(paid <= latest, "client {i}: the gateway holds more than was signed: {ch}");
        if latest_acked {
            assert_eq!(paid, latest, "client {i}: acknowledged {latest} sat, journal has {paid}: {ch}");
        }
        // The kernel's budget is exactly the journal's total, priced: a payment credited
        // twice (once before the kill, again on restart) would show up here.
        let credit = bytes_for_payment(Amount::from_sat(paid), price).to_u64();
        assert_eq!(n(&row, "credited_bytes"), credit, "client {i}: {row}");
        assert_eq!(n(&ch, "credited_bytes"), credit, "client {i}: {ch}");
        assert!(n(&row, "up_bytes") + n(&row, "down_bytes") <= credit, "client {i}: {row}");
    }
}

#[test]
fn gateway_reboot_restores_budgets_and_usage_from_the_store_losing_at_most_one_snapshot_interval() {
    let Some(world) = Testbed::start(2).unwrap() else { return };
    let funding = world.fund(2, Amount::from_sat(100_000)).unwrap();
    // Default rate limits: the agents lose their event stream at the reboot.
    let opts = ControllerOpts { snapshot_interval_secs: Some(2), ..ControllerOpts::story() };
    let interval = Duration::from_secs(opts.snapshot_interval_secs.unwrap());
    let price = PriceMsatPerMib::new(opts.price_msat_per_mib.unwrap()).unwrap();
    let ctl = world.start_controller(&opts).unwrap();
    let mut agents: Vec<Agent> = (0..2)
        .map(|i| world.start_agent(i, &AgentOpts::new(funding[i].file.clone(), 30_000)).unwrap())
        .collect();
    for a in &mut agents {
        a.wait_for("channel funded", Duration::from_secs(60)).unwrap();
    }
    // Unconfirmed channels get at most the first payment + one chunk: confirm them.
    world.mine(1);
    let (quiet, busy) = (world.lan.clients[0].mac.clone(), world.lan.clients[1].mac.clone());

    // Client 0 downloads, then stays quiet for longer than a snapshot interval.
    assert!(world.fetch(0, 3 * MIB, Duration::from_secs(10)).complete);
    std::thread::sleep(interval + Duration::from_secs(2));
    // Client 1 is in the middle of a download when the power goes.
    let rate = MIB;
    let (quiet_before, busy_before) = std::thread::scope(|s| {
        let world = &world;
        let dl = s.spawn(move || world.fetch_paced(1, 8 * MIB, rate, Duration::from_secs(30)));
        std::thread::sleep(Duration::from_secs(4));
        // Power off: the controller dies, and with the reboot the kernel forgets
        // everything; read the kernel's last word in between.
        ctl.crash();
        let before = (world.kernel_usage(&quiet).unwrap(), world.kernel_usage(&busy).unwrap());
        world.wipe_pins();
        dl.join().unwrap();
        before
    });
    assert!(world.kernel_usage(&busy).is_none(), "the reboot left maps behind");

    let ctl = world.start_controller(&opts).unwrap();
    let log = std::fs::read_to_string(ctl.log_path()).unwrap();
    assert_eq!(log.matches("reconciled with the store pinned=false").count(), 2, "{}", ctl.log_tail(40));
    let quiet_row = ctl.client(&quiet).unwrap();
    let busy_after = world.kernel_usage(&busy).unwrap();
    // Budgets: exactly the journal's totals, priced.
    // The busy agent carries on paying after the restart: compare a client row with
    // the journal total read on both sides of it, unchanged.
    for mac in [&quiet, &busy] {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let paid_sat = |c: Option<Value>| c.map(|c| n(&c, "paid_sat")).unwrap();
            let before = paid_sat(ctl.channel(mac));
            let row = ctl.client(mac).unwrap();
            if paid_sat(ctl.channel(mac)) == before {
                let paid = Amount::from_sat(before);
                assert_eq!(n(&row, "credited_bytes"), bytes_for_payment(paid, price).to_u64(), "{row}");
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{mac}: payments never paused for a consistent read");
        }
    }
    // The quiet client's usage comes back to the byte (its last snapshot is current).
    assert_eq!(
        (n(&quiet_row, "up_bytes"), n(&quiet_row, "down_bytes")),
        (quiet_before.usage.up_bytes, quiet_before.usage.down_bytes),
        "quiet client's usage not restored exactly: {quiet_row}"
    );
    // The busy client loses what it used since the last snapshot: in its favour, and
    // no more than one snapshot interval of traffic (plus a little scheduling slack).
    let (before, after) = (busy_before.used().to_u64(), busy_after.used().to_u64());
    assert!(after <= before, "the reboot billed the client more: {after} > {before}");
    let bound = rate * (interval.as_secs() + 1) + 64 * 1024;
    assert!(before - after <= bound, "lost {} bytes of billing, more than one interval ({bound})", before - after);
    assert!(after > 0, "usage was restored from the store");

    // And the clients carry on: paying, downloading, metered again.
    let f = world.fetch_paced(1, 4 * MIB, 2 * MIB, Duration::from_secs(15));
    assert!(f.complete, "{f:?}\nagent:\n{}", agents[1].output());
    let row = wait_until("the busy client to be billed again", Duration::from_secs(5), || {
        ctl.client(&busy).filter(|r| n(r, "up_bytes") + n(r, "down_bytes") >= after + 4 * MIB)
    });
    assert!(n(&row, "up_bytes") + n(&row, "down_bytes") <= n(&row, "credited_bytes"), "{row}");
}

/// The agent's state file as the library reads it (the test edits it while the agent
/// is dead, to stand in for the two crash windows around a payment).
fn agent_record(agent: &Agent) -> (StateDir, bitmesh_client::state::SavedChannel) {
    let dir = StateDir::open(&agent.state_dir).unwrap();
    let mut all = dir.all().unwrap();
    assert_eq!(all.len(), 1, "one channel in the agent's state directory");
    (dir, all.remove(0))
}

/// Journal rows (`bitmesh channels`) of `mac`: one per channel ever opened.
fn channel_rows(ctl: &bitmesh_tests::controller::Controller<'_>, mac: &str) -> Vec<Value> {
    let rows = ctl.admin_json("channels").unwrap();
    rows.as_array().unwrap().iter().filter(|r| r["mac"].as_str() == Some(mac)).cloned().collect()
}

/// Lines of the controller's log that credit a payment of exactly `total` sat.
fn credited_lines(ctl: &bitmesh_tests::controller::Controller<'_>, total: u64) -> usize {
    let log = std::fs::read_to_string(ctl.log_path()).unwrap();
    let (a, b) = (format!("total_sat={total} "), format!("total_sat={total}}}"));
    log.lines().filter(|l| l.contains("payment credited") && (l.contains(&a) || l.contains(&b))).count()
}

#[test]
fn agent_killed_mid_session_resumes_its_channel_and_resends_an_unacknowledged_update_once() {
    let Some(world) = Testbed::start(1).unwrap() else { return };
    let funding = world.fund(1, Amount::from_sat(100_000)).unwrap();
    let opts = ControllerOpts::story();
    let price = PriceMsatPerMib::new(opts.price_msat_per_mib.unwrap()).unwrap();
    let chunk = ByteCount(opts.chunk_bytes.unwrap());
    let ctl = world.start_controller(&opts).unwrap();
    let mac = world.lan.clients[0].mac.clone();
    let agent_opts = AgentOpts::new(funding[0].file.clone(), 30_000);
    let mut agent = world.start_agent(0, &agent_opts).unwrap();
    agent.wait_for("channel funded", Duration::from_secs(60)).unwrap();
    // Unconfirmed channels get at most the first payment + one chunk: confirm them.
    world.mine(1);
    assert!(world.fetch(0, 3 * MIB, Duration::from_secs(10)).complete);
    wait_until("the agent's payments to be acknowledged", Duration::from_secs(10), || {
        let (total, acked) = signed(&agent);
        (acked && ctl.channel(&mac).map(|c| n(&c, "paid_sat")) == Some(total)).then_some(())
    });
    // Let a last top-up for the tail of the download land before the kill.
    std::thread::sleep(Duration::from_secs(1));

    // Crash 1, the answer lost: the gateway journaled t1 but the agent died before it
    // saved the acknowledgement. Its file then says "t1, not acknowledged".
    agent.kill9();
    let before = ctl.channel(&mac).unwrap();
    let (dir, mut first) = agent_record(&agent);
    let t1 = first.paid().to_sat();
    assert_eq!(n(&before, "paid_sat"), t1, "the gateway holds the agent's last total: {before}");
    first.latest.as_mut().unwrap().acked = false;
    dir.save(&first).unwrap();
    let mut agent = world.start_agent(0, &agent_opts).unwrap();
    agent.wait_for("resuming channel", Duration::from_secs(10)).unwrap();
    wait_until("the re-sent update to be acknowledged", Duration::from_secs(10), || signed(&agent).1.then_some(()));
    let after = ctl.channel(&mac).unwrap();
    assert_eq!(n(&after, "paid_sat"), t1, "{after}");
    assert_eq!(n(&after, "payments"), n(&before, "payments"), "the duplicate was not journaled again: {after}");
    assert_eq!(credited_lines(&ctl, t1), 1, "t1 credited once:\n{}", ctl.log_tail(30));

    // Crash 2, in the middle of a download, the update saved but never sent: the
    // agent had signed and stored t2 = (acknowledged total + 1 sat) when it died.
    let fetch = std::thread::scope(|s| {
        let world = &world;
        let dl = s.spawn(move || world.fetch_paced(0, 8 * MIB, MIB, Duration::from_secs(30)));
        std::thread::sleep(Duration::from_secs(3));
        agent.kill9();
        let (dir, mut rec) = agent_record(&agent);
        let paid = ctl.channel(&mac).map(|c| n(&c, "paid_sat")).unwrap();
        assert!(rec.paid().to_sat() >= paid, "the agent saved every total it sent: {} < {paid}", rec.paid());
        let t2 = rec.paid() + Amount::from_sat(1);
        let signature = sign_update(&rec.channel().unwrap(), t2, &rec.client_secret).unwrap();
        rec.latest = Some(SignedState { total_paid: t2, signature, acked: false });
        dir.save(&rec).unwrap();
        // Dead for a second: the download stalls at the prepaid budget, then goes on.
        std::thread::sleep(Duration::from_secs(1));
        agent = world.start_agent(0, &agent_opts).unwrap();
        wait_until("the saved update to reach the gateway", Duration::from_secs(10), || {
            (credited_lines(&ctl, t2.to_sat()) == 1).then_some(())
        });
        dl.join().unwrap()
    });
    assert!(fetch.complete, "the download carried on after the restart: {fetch:?}\nagent:\n{}", agent.output());

    // Same channel throughout, opened once; what the gateway holds is what the agent
    // signed last; and that is within received + one chunk and the spending cap. The
    // agent may still have a top-up in flight (saved, not yet acknowledged) when the
    // download ends: wait for it to land rather than read mid-flight.
    // The agent keeps running (and may top up again), so the checks below use the
    // state read here, where its last update was acknowledged and held, not a later read.
    let (latest, ch, row) = wait_until("the agent's last update acknowledged and held by the gateway", Duration::from_secs(15), || {
        let (latest, acked) = signed(&agent);
        let ch = ctl.channel(&mac)?;
        let row = ctl.client(&mac)?;
        (acked && n(&ch, "paid_sat") == latest && n(&row, "credited_bytes") == bytes_for_payment(Amount::from_sat(latest), price).to_u64())
            .then_some((latest, ch, row))
    });
    let (_, last) = agent_record(&agent);
    assert_eq!(last.channel_id, first.channel_id, "the restarts resumed the same channel");
    assert_eq!(channel_rows(&ctl, &mac).len(), 1, "no second channel opened");
    assert_eq!(agent.output().matches("opened channel").count(), 1, "{}", agent.output());
    let cap = payment_for_bytes(last.received.saturating_add(chunk), price);
    assert!(last.paid() <= cap, "signed {} above received + one chunk ({cap}): {ch}", last.paid());
    assert!(last.paid() <= Amount::from_sat(agent_opts.max_spend_sat));
    assert!(latest <= last.paid().to_sat(), "the gateway holds {latest} sat, above what the agent signed: {ch} {row}");
}
