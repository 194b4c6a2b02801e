//! 1:1 help messages over HTTP and live, against real Postgres and Redis:
//! kept for an offline instructor and pushed when they connect, delivered
//! live to every socket of the instructor, polled by the student with the
//! class token and e-mail, paged, marked read, and refused with clear
//! errors.

mod common;

use cellmon_testkit::fixture::TestBackends;
use common::{Gateway, student};
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn body(response: reqwest::Response) -> anyhow::Result<(StatusCode, Value)> {
    let status = response.status();
    Ok((status, response.json().await?))
}

#[tokio::test]
async fn messages_to_an_offline_instructor_are_kept_and_delivered_on_connect() -> anyhow::Result<()>
{
    let backends = TestBackends::shared().await?;
    let mut gateway = Gateway::start(&backends, |_| {}).await?;
    let (class, class_token) = gateway.class().await?;
    let (teacher, token) = gateway.instructor(&[class]).await?;
    let email = "hanako@example.ac.jp";
    let hanako = student(&gateway.pool, class, email).await?;
    let http = reqwest::Client::new();
    let base = gateway.http();

    // The student asks while no dashboard is open.
    let (status, sent) = body(
        http.post(format!("{base}/api/v1/student/messages"))
            .json(
                &json!({"email": email, "token": class_token, "instructorId": teacher,
                          "body": "セル3が動きません"}),
            )
            .send()
            .await?,
    )
    .await?;
    assert_eq!(status, StatusCode::CREATED, "{sent}");
    assert_eq!(sent["sender"], "student");
    assert_eq!(sent["studentId"], hanako.0.to_string());

    // The instructor connects later and gets it without asking.
    let mut ws = gateway.connect(&token).await?;
    let pushed = ws.expect("direct_message").await?;
    assert_eq!(pushed["message"]["id"], sent["id"]);
    assert_eq!(pushed["message"]["body"], "セル3が動きません");

    let (_, unread) = body(
        http.get(format!("{base}/api/v1/messages/unread"))
            .bearer_auth(&token)
            .send()
            .await?,
    )
    .await?;
    assert_eq!(unread["total"], 1, "{unread}");
    assert_eq!(unread["threads"][0]["studentId"], hanako.0.to_string());

    // The instructor answers; the student polls with the class token.
    let thread = format!("{base}/api/v1/classes/{class}/students/{hanako}/messages");
    let (status, reply) = body(
        http.post(&thread)
            .bearer_auth(&token)
            .json(&json!({"body": "print文を確認して"}))
            .send()
            .await?,
    )
    .await?;
    assert_eq!(status, StatusCode::CREATED, "{reply}");
    // The instructor's own dashboard sees the reply too.
    let echoed = ws.expect("direct_message").await?;
    assert_eq!(echoed["message"]["id"], reply["id"], "{echoed}");
    let (_, mine) = body(
        http.get(format!("{base}/api/v1/student/messages/unread"))
            .query(&[("email", email), ("token", &class_token)])
            .send()
            .await?,
    )
    .await?;
    assert_eq!(mine["total"], 1, "{mine}");
    let (_, history) = body(
        http.get(format!("{base}/api/v1/student/messages"))
            .bearer_auth(&class_token)
            .query(&[("email", email)])
            .send()
            .await?,
    )
    .await?;
    let bodies: Vec<&str> = history["messages"]
        .as_array()
        .map(|m| m.iter().filter_map(|m| m["body"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        bodies,
        ["print文を確認して", "セル3が動きません"],
        "newest first"
    );

    // Marking read on each side clears only that side's unread.
    let (_, marked) = body(
        http.post(format!("{thread}/read"))
            .bearer_auth(&token)
            .json(&json!({"upTo": reply["id"]}))
            .send()
            .await?,
    )
    .await?;
    assert_eq!(marked["marked"], 1);
    let (_, unread) = body(
        http.get(format!("{base}/api/v1/messages/unread"))
            .bearer_auth(&token)
            .send()
            .await?,
    )
    .await?;
    assert_eq!(unread["total"], 0);
    let (_, marked) = body(
        http.post(format!("{base}/api/v1/student/messages/read"))
            .json(
                &json!({"email": email, "token": class_token, "instructorId": teacher,
                          "upTo": reply["id"]}),
            )
            .send()
            .await?,
    )
    .await?;
    assert_eq!(marked["marked"], 1);

    // A dashboard that connects now has nothing unread pushed.
    let mut later = gateway.connect(&token).await?;
    later.send(json!({"type": "ping"})).await?;
    later.expect("pong").await?;
    gateway.stop().await
}

#[tokio::test]
async fn every_socket_of_the_instructor_gets_a_message_live_and_history_pages() -> anyhow::Result<()>
{
    let backends = TestBackends::shared().await?;
    let mut gateway = Gateway::start(&backends, |_| {}).await?;
    let (class, class_token) = gateway.class().await?;
    let (teacher, token) = gateway.instructor(&[class]).await?;
    let (_, colleague) = gateway.instructor(&[class]).await?;
    let email = "taro@example.ac.jp";
    let taro = student(&gateway.pool, class, email).await?;
    let mut mine = Vec::new();
    for _ in 0..3 {
        mine.push(gateway.connect(&token).await?);
    }
    let mut theirs = gateway.connect(&colleague).await?;
    let http = reqwest::Client::new();
    let base = gateway.http();
    for n in 0..5 {
        let response = http
            .post(format!("{base}/api/v1/student/messages"))
            .json(
                &json!({"email": email, "token": class_token, "instructorId": teacher,
                          "body": format!("question {n}")}),
            )
            .send()
            .await?;
        assert_eq!(response.status(), StatusCode::CREATED);
    }
    for ws in &mut mine {
        for n in 0..5 {
            let pushed = ws.expect("direct_message").await?;
            assert_eq!(pushed["message"]["body"], format!("question {n}"));
        }
    }
    // It is 1:1: the colleague's dashboard gets none of it.
    theirs.send(json!({"type": "ping"})).await?;
    theirs.expect("pong").await?;

    let thread = format!("{base}/api/v1/classes/{class}/students/{taro}/messages");
    let (_, page) = body(
        http.get(&thread)
            .bearer_auth(&token)
            .query(&[("limit", "2")])
            .send()
            .await?,
    )
    .await?;
    assert_eq!(page["messages"][0]["body"], "question 4");
    assert_eq!(page["messages"][1]["body"], "question 3");
    let before = page["nextBefore"].as_i64().unwrap_or_default().to_string();
    let (_, page) = body(
        http.get(&thread)
            .bearer_auth(&token)
            .query(&[("limit", "10"), ("before", before.as_str())])
            .send()
            .await?,
    )
    .await?;
    assert_eq!(page["messages"].as_array().map(Vec::len), Some(3));
    assert_eq!(page["nextBefore"], Value::Null, "the last page");
    // The colleague's thread with the student is empty.
    let (_, page) = body(http.get(&thread).bearer_auth(&colleague).send().await?).await?;
    assert_eq!(page["messages"], json!([]));
    gateway.stop().await
}

#[tokio::test]
async fn bad_requests_get_clear_json_errors() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let mut gateway = Gateway::start(&backends, |_| {}).await?;
    let (class, class_token) = gateway.class().await?;
    let (other_class, _) = gateway.class().await?;
    let (teacher, token) = gateway.instructor(&[class]).await?;
    let (_, outsider) = gateway.instructor(&[other_class]).await?;
    let email = "jiro@example.ac.jp";
    let jiro = student(&gateway.pool, class, email).await?;
    let stranger = student(&gateway.pool, other_class, "s@example.ac.jp").await?;
    let http = reqwest::Client::new();
    let base = gateway.http();
    let thread = format!("{base}/api/v1/classes/{class}/students/{jiro}/messages");

    let cases: Vec<(&str, reqwest::RequestBuilder, StatusCode, &str)> = vec![
        (
            "no token",
            http.get(&thread),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            "not teaching",
            http.get(&thread).bearer_auth(&outsider),
            StatusCode::FORBIDDEN,
            "forbidden",
        ),
        (
            "student of another class",
            http.post(format!(
                "{base}/api/v1/classes/{class}/students/{stranger}/messages"
            ))
            .bearer_auth(&token)
            .json(&json!({"body": "hi"})),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "empty body",
            http.post(&thread)
                .bearer_auth(&token)
                .json(&json!({"body": "  "})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "bad_body",
        ),
        (
            "body too long",
            http.post(&thread)
                .bearer_auth(&token)
                .json(&json!({"body": "あ".repeat(4001)})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "bad_body",
        ),
        (
            "wrong class token",
            http.get(format!("{base}/api/v1/student/messages"))
                .query(&[("email", email), ("token", "nope")]),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            "unknown e-mail",
            http.get(format!("{base}/api/v1/student/messages"))
                .query(&[("email", "nobody@example.ac.jp"), ("token", &class_token)]),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "instructor of another class",
            http.post(format!("{base}/api/v1/student/messages"))
                .json(&json!({
                "email": email, "token": class_token,
                "instructorId": uuid::Uuid::new_v4(), "body": "hi"})),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
    ];
    for (name, request, status, code) in cases {
        let response = request.send().await?;
        let got = response.status();
        let json: Value = response.json().await?;
        assert_eq!(got, status, "{name}: {json}");
        assert_eq!(json["error"]["code"], code, "{name}: {json}");
        assert!(json["error"]["message"].is_string(), "{name}: {json}");
    }
    // Malformed input is a JSON error as well, and nothing was stored by
    // any of the above.
    for request in [
        http.post(&thread)
            .bearer_auth(&token)
            .json(&json!({"body": "hi", "extra": 1})),
        http.post(&thread)
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body("{\"body\": "),
        http.get(format!(
            "{base}/api/v1/classes/{class}/students/not-a-uuid/messages"
        ))
        .bearer_auth(&token),
        http.get(&thread)
            .bearer_auth(&token)
            .query(&[("limit", "many")]),
    ] {
        let response = request.send().await?;
        assert!(response.status().is_client_error(), "{}", response.status());
        let json: Value = response.json().await?;
        assert_eq!(json["error"]["code"], "bad_request", "{json}");
    }
    let stored =
        cellmon_store::messages::history(&gateway.pool, class, teacher, jiro, None, 10).await?;
    assert!(stored.is_empty(), "{stored:?}");
    gateway.stop().await
}
