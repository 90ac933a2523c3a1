//! Device actors are activated on demand, passivated when idle or over the resident bound,
//! and reloaded from the store on the next request without losing anything.

mod common;

use std::time::Duration;

use common::*;

fn gauge(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| {
            line.strip_prefix(name)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

#[actix_rt::test]
async fn resident_actors_stay_under_their_bound_and_reload_on_demand() {
    let server = Server::start_with(&["--max-resident-actors", "5", "--actor-idle-secs", "3600"]);
    let devices: Vec<Device> = (0..20)
        .map(|n| Device::new(&server, &format!("BOUNDED-{n:02}")))
        .collect();
    for device in &devices {
        device.enroll(&server).await;
        enqueue(
            &server,
            &device.udid,
            &format!("CMD-{}", device.udid),
            "ProfileList",
        )
        .await;
    }
    let mut resident = f64::MAX;
    for _ in 0..50 {
        actix_rt::time::sleep(Duration::from_millis(100)).await;
        resident = gauge(&metrics_text(&server).await, "orchard_resident_actors ");
        if resident <= 5.0 {
            break;
        }
    }
    assert!(resident <= 5.0, "{resident} actors resident, bound is 5");
    for device in &devices {
        assert_eq!(
            device.drain(&server).await,
            [format!("CMD-{}", device.udid)],
            "a passivated device reloads its queue"
        );
    }
}

#[actix_rt::test]
async fn an_idle_actor_leaves_memory_and_keeps_its_last_seen() {
    let server = Server::start_with(&["--actor-idle-secs", "1"]);
    let device = Device::new(&server, "IDLE-DEVICE");
    device.enroll(&server).await;
    device.connect(&server, device.idle()).await;
    let mut resident = f64::MAX;
    for _ in 0..40 {
        actix_rt::time::sleep(Duration::from_millis(100)).await;
        resident = gauge(&metrics_text(&server).await, "orchard_resident_actors ");
        if resident == 0.0 {
            break;
        }
    }
    assert_eq!(resident, 0.0);
    let (status, info) = api_get(&server, "/api/v1/devices/IDLE-DEVICE").await;
    assert_eq!(status, 200);
    assert!(!info["last_seen"].as_str().unwrap().is_empty());
    assert_eq!(info["enabled"], true);
}
