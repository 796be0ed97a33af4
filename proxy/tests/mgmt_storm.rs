//! Concurrent writers: 8 clients x 500 changes over the unix socket. Every change lands,
//! none is lost, none fails (in particular never with a busy database).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod mgmt_support;

use common::*;
use mgmt_support::*;
use proxy_proto::v1 as pb;

const CLIENTS: usize = 8;
const CHANGES_PER_CLIENT: usize = 500;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_clients_times_500_changes_lose_nothing() {
    let up = upstream("u").await;
    let proxy = start_proxy(CONFIG).await;
    let mut api = connect(&proxy).await;
    let start = create_pool(&mut api, pool_msg("p", &[up.address()])).await;

    let mut tasks = Vec::new();
    for client in 0..CLIENTS {
        // Each client has its own connection.
        let mut api = connect(&proxy).await;
        tasks.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            // Half creations, half updates of what this client created.
            for i in 0..CHANGES_PER_CLIENT / 2 {
                let r = route_msg(
                    &format!("c{client}-r{i}"),
                    "",
                    &format!("/c{client}/r{i}"),
                    "p",
                );
                if let Err(e) = api
                    .routes
                    .create_route(pb::CreateRouteRequest { route: Some(r) })
                    .await
                {
                    errors.push(e);
                }
            }
            for i in 0..CHANGES_PER_CLIENT / 2 {
                let r = pb::Route {
                    priority: i32::try_from(client * 1000 + i).expect("small"),
                    ..route_msg(
                        &format!("c{client}-r{i}"),
                        "",
                        &format!("/c{client}/r{i}"),
                        "p",
                    )
                };
                if let Err(e) = api
                    .routes
                    .update_route(pb::UpdateRouteRequest { route: Some(r) })
                    .await
                {
                    errors.push(e);
                }
            }
            errors
        }));
    }
    let mut errors = Vec::new();
    for task in tasks {
        errors.extend(task.await.expect("client task"));
    }
    assert!(
        errors.is_empty(),
        "{} calls failed, first: {:?}",
        errors.len(),
        errors.first()
    );

    let listed = api
        .routes
        .list_routes(pb::ListRoutesRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(
        listed.revision,
        start + (CLIENTS * CHANGES_PER_CLIENT) as u64,
        "one revision per change"
    );
    assert_eq!(listed.routes.len(), CLIENTS * CHANGES_PER_CLIENT / 2);
    for route in &listed.routes {
        let (client, i) = route
            .name
            .trim_start_matches('c')
            .split_once("-r")
            .map(|(c, i)| {
                (
                    c.parse::<i32>().expect("client"),
                    i.parse::<i32>().expect("index"),
                )
            })
            .expect("name shape");
        assert_eq!(
            route.priority,
            client * 1000 + i,
            "update of {} lost",
            route.name
        );
    }
    // And it is all on disk: a restart sees the same.
    let TestProxy { daemon, dir } = proxy;
    daemon.stop().await;
    let proxy = start_proxy_in(dir, CONFIG).await;
    let mut api = connect(&proxy).await;
    let after = api
        .routes
        .list_routes(pb::ListRoutesRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(after.revision, listed.revision);
    assert_eq!(after.routes, listed.routes);
    assert_eq!(
        get(proxy.addr("web"), "x", "/c7/r249")
            .await
            .header("x-upstream"),
        Some("u")
    );
}
