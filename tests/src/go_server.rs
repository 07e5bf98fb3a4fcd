//! How a Go zbus v1 server (one worker) serves a queue, for the doubles of
//! the other Zero-OS modules: pop a request, answer it on its reply list
//! (kept 300 s), one at a time.

use vmd::zbus::codec;
use vmd::zbus::wire::Request;

/// Serves `queue` on `broker` until Redis goes away (the test is ending) or
/// the task is aborted. `answer` gets each request, decoded and as sent,
/// and gives the reply to push (`None`: none).
pub async fn spawn<F>(
    broker: &vmd::zbus::broker::Broker,
    queue: String,
    mut answer: F,
) -> tokio::task::JoinHandle<()>
where
    F: FnMut(&Request, &[u8]) -> Option<Vec<u8>> + Send + 'static,
{
    let mut conn = broker.connect().await.unwrap();
    tokio::spawn(async move {
        loop {
            let popped: redis::RedisResult<Option<(String, Vec<u8>)>> = redis::cmd("BLPOP")
                .arg(&queue)
                .arg(1.0)
                .query_async(&mut conn)
                .await;
            let bytes = match popped {
                Ok(Some((_, bytes))) => bytes,
                Ok(None) => continue,
                Err(_) => return,
            };
            let Ok(req) = codec::decode::<Request>(&bytes) else {
                continue;
            };
            if let Some(reply) = answer(&req, &bytes) {
                let _: redis::RedisResult<()> = redis::pipe()
                    .cmd("RPUSH")
                    .arg(&req.reply_to)
                    .arg(reply)
                    .cmd("EXPIRE")
                    .arg(&req.reply_to)
                    .arg(300)
                    .query_async(&mut conn)
                    .await;
            }
        }
    })
}
