#include "apps/http_server.h"

#include <algorithm>
#include <atomic>
#include <cctype>
#include <deque>
#include <optional>
#include <thread>

#include <sys/resource.h>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/log.h"

namespace atmoe::app {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;

const std::string* HttpRequest::header(std::string_view lower_name) const {
  for (const auto& [k, v] : headers)
    if (k == lower_name) return &v;
  return nullptr;
}

namespace {

constexpr size_t kHeaderLimit = size_t(64) << 10;
constexpr size_t kPipelinedLimit = size_t(64) << 10;  // bytes read ahead while a reply is pending
constexpr double kLingerS = 2;                        // draining an unread body after an error reply


std::string lower(boost::beast::string_view s) {
  std::string r(s.data(), s.size());
  for (char& c : r) c = char(std::tolower(static_cast<unsigned char>(c)));
  return r;
}

}  // namespace

struct Session;

struct HttpServer::Impl {
  HttpServerOptions o;
  HttpHandler handler;
  net::io_context io{1};
  net::executor_work_guard<net::io_context::executor_type> work{io.get_executor()};
  tcp::acceptor acc{io};
  std::thread th;
  std::atomic<int> conns{0};
  std::vector<std::weak_ptr<Session>> sessions;  // IO thread only
  bool stopping = false;                          // IO thread only
  int port = 0;
  net::steady_timer backoff{io};  // accept() out of file descriptors: retry later
  double last_emfile_log = -1e9;

  void accept();
  std::string error_json(int status, const std::string& msg) const {
    if (o.error_body) return o.error_body(status, msg);
    return nlohmann::json{{"error", {{"message", msg}, {"type", "error"}, {"param", nullptr}, {"code", status}}}}.dump();
  }
};

struct Session : std::enable_shared_from_this<Session> {
  HttpServer::Impl& srv;
  tcp::socket sock;
  net::steady_timer timer;
  beast::flat_buffer buf;
  std::optional<http::request_parser<http::string_body>> parser;
  std::string peer;
  uint64_t seq = 0;  // the current exchange
  bool busy = false, keep_alive = true, http10 = false, head_only = false, headers_sent = false, reply_ended = false;
  bool watching = false, resume_read = false, closing = false, lingering = false;
  std::deque<std::string> out;
  bool writing = false;
  std::function<void()> gone_cb;
  bool gone = false;

  Session(HttpServer::Impl& s, tcp::socket sk) : srv(s), sock(std::move(sk)), timer(srv.io) {
    ++srv.conns;
    beast::error_code ec;
    auto ep = sock.remote_endpoint(ec);
    if (!ec) peer = ep.address().to_string() + ":" + std::to_string(ep.port());
  }
  ~Session() { --srv.conns; }

  void arm(double s) {
    timer.expires_after(std::chrono::milliseconds(int64_t(s * 1000)));
    timer.async_wait([self = shared_from_this()](beast::error_code ec) {
      if (!ec) self->close();
    });
  }
  void disarm() { timer.cancel(); }

  void client_gone() {
    if (busy && !reply_ended && !gone) {
      gone = true;
      if (gone_cb) {
        auto f = std::move(gone_cb);
        gone_cb = nullptr;
        f();
      }
    }
  }

  void close() {
    if (closing) return;
    closing = true;
    client_gone();
    beast::error_code ec;
    sock.shutdown(tcp::socket::shutdown_both, ec);
    sock.close(ec);
    timer.cancel();
  }

  // After an error reply with an unread body: stop sending, discard what the client still
  // sends for a moment (so it reads the reply instead of a reset), then close.
  void linger() {
    lingering = true;
    beast::error_code ec;
    sock.shutdown(tcp::socket::shutdown_send, ec);
    arm(kLingerS);
    discard();
  }
  void discard() {
    buf.consume(buf.size());
    sock.async_read_some(buf.prepare(4096), [self = shared_from_this()](beast::error_code ec, size_t) {
      if (ec || self->closing) return self->close();
      self->discard();
    });
  }

  void do_read() {
    if (closing || srv.stopping) return close();
    busy = false;
    parser.emplace();
    parser->body_limit(srv.o.body_limit);
    parser->header_limit(uint32_t(kHeaderLimit));
    arm(srv.o.timeout_s);
    http::async_read_header(sock, buf, *parser, [self = shared_from_this()](beast::error_code ec, size_t) {
      self->on_header(ec);
    });
  }

  // Transport-level refusals (before any handler): an OpenAI-shaped error, then close.
  void reject(int status, const std::string& msg) { reject_body(status, srv.error_json(status, msg), true); }
  void reject_body(int status, std::string body, bool count) {
    begin_exchange();
    keep_alive = false;
    if (count && srv.o.on_transport_reply) srv.o.on_transport_reply(status);
    respond(status, "application/json", std::move(body), {});
  }

  bool read_failed(beast::error_code ec) {
    if (!ec) return false;
    disarm();
    if (ec == http::error::body_limit)
      reject(413, "the request body is over the server's limit of " + std::to_string(srv.o.body_limit) + " bytes");
    else if (ec == http::error::header_limit)
      reject(431, "the request's headers are over " + std::to_string(kHeaderLimit) + " bytes");
    else if (ec.category() == http::make_error_code(http::error::bad_target).category() && ec != http::error::end_of_stream &&
             ec != http::error::partial_message)
      reject(400, "malformed HTTP request: " + ec.message());
    else
      close();
    return true;
  }

  void on_header(beast::error_code ec) {
    if (closing || read_failed(ec)) return;
    auto& m = parser->get();
    if (srv.o.check_head) {  // before the body: a refused request is not buffered
      HttpRequest h;
      h.method = std::string(m.method_string());
      h.target = std::string(m.target());
      h.peer = peer;
      for (const auto& f : m) h.headers.emplace_back(lower(f.name_string()), std::string(f.value()));
      std::string body;
      if (const int st = srv.o.check_head(h, body)) {
        disarm();
        head_only = h.method == "HEAD";
        http10 = m.version() < 11;
        return reject_body(st, std::move(body), false);
      }
    }
    if (lower(m[http::field::expect]) == "100-continue" && !parser->is_done()) {
      beast::error_code wec;  // 25 bytes on an idle socket: written at once
      net::write(sock, net::buffer(std::string_view("HTTP/1.1 100 Continue\r\n\r\n")), wec);
    }
    http::async_read(sock, buf, *parser, [self = shared_from_this()](beast::error_code ec2, size_t) {
      self->on_read(ec2);
    });
  }

  void begin_exchange() {
    ++seq;
    busy = true;
    headers_sent = reply_ended = gone = false;
    gone_cb = nullptr;
  }

  void on_read(beast::error_code ec) {
    if (closing || read_failed(ec)) return;
    disarm();
    auto& m = parser->get();
    HttpRequest r;
    r.method = std::string(m.method_string());
    r.target = std::string(m.target());
    r.body = std::move(m.body());
    r.peer = peer;
    for (const auto& f : m) r.headers.emplace_back(lower(f.name_string()), std::string(f.value()));
    keep_alive = m.keep_alive();
    http10 = m.version() < 11;
    head_only = r.method == "HEAD";
    begin_exchange();
    auto ex = make_exchange();
    try {
      srv.handler(ex, r);
    } catch (const std::exception& e) {
      ATMOE_LOG("http")->error("{} {}: {}", r.method, r.target, e.what());
      if (srv.o.on_transport_reply) srv.o.on_transport_reply(500);
      if (!headers_sent) respond(500, "application/json", srv.error_json(500, e.what()), {});
    }
    start_watch();
  }

  // While a reply is pending: a read that notices the client going away (EOF, reset).
  // Bytes that arrive meanwhile (a pipelined request) stay in the buffer.
  void start_watch() {
    if (watching || closing || !busy || buf.size() > kPipelinedLimit) return;
    watching = true;
    sock.async_read_some(buf.prepare(4096), [self = shared_from_this()](beast::error_code ec, size_t n) {
      self->on_watch(ec, n);
    });
  }
  void on_watch(beast::error_code ec, size_t n) {
    watching = false;
    if (n) buf.commit(n);
    if (closing) return;
    if (ec && ec != net::error::operation_aborted) {
      if (busy) close();  // the client is gone: its request is cancelled
      else resume_read = false, do_read();  // the reply is out; the next read sees the EOF
      return;
    }
    if (busy) return start_watch();
    if (resume_read) {
      resume_read = false;
      do_read();
    }
  }

  void end_exchange() {
    busy = false;
    gone_cb = nullptr;
    if (!keep_alive || srv.stopping) {
      if (parser && !parser->is_done()) return linger();
      return close();
    }
    if (watching) {
      resume_read = true;
      beast::error_code ec;
      sock.cancel(ec);
    } else {
      do_read();
    }
  }

  void send(std::string s, bool last) {
    if (last) reply_ended = true;
    out.push_back(std::move(s));
    write_next();
  }
  void write_next() {
    if (writing || closing) return;
    if (out.empty()) {
      if (busy && reply_ended) end_exchange();
      return;
    }
    writing = true;
    arm(srv.o.timeout_s);
    net::async_write(sock, net::buffer(out.front()), [self = shared_from_this()](beast::error_code ec, size_t) {
      self->writing = false;
      self->disarm();
      if (ec) return self->close();
      self->out.pop_front();
      self->write_next();
    });
  }

  std::string head(int status, const std::string& ct, const HttpHeaders& extra, int64_t length) {
    std::string h = "HTTP/1.1 " + std::to_string(status) + " " +
                    std::string(http::obsolete_reason(http::status(unsigned(status)))) + "\r\nServer: atmoe\r\n";
    if (!ct.empty()) h += "Content-Type: " + ct + "\r\n";
    if (length >= 0) h += "Content-Length: " + std::to_string(length) + "\r\n";
    else if (!http10) h += "Transfer-Encoding: chunked\r\nCache-Control: no-cache\r\n";
    if (!keep_alive || srv.stopping) h += "Connection: close\r\n";
    else if (http10) h += "Connection: keep-alive\r\n";
    for (const auto& [k, v] : extra) {
      // Header values come from clients too (X-Request-Id): no line breaks.
      if (k.find_first_of("\r\n") != std::string::npos || v.find_first_of("\r\n") != std::string::npos) continue;
      h += k + ": " + v + "\r\n";
    }
    return h + "\r\n";
  }

  void respond(int status, std::string ct, std::string body, const HttpHeaders& extra) {
    if (headers_sent || closing) return;
    headers_sent = true;
    std::string msg = head(status, ct, extra, int64_t(body.size()));
    if (!head_only) msg += body;  // HEAD: the headers of the GET reply, no body
    send(std::move(msg), true);
  }
  void start_stream(int status, std::string ct, const HttpHeaders& extra) {
    if (headers_sent || closing) return;
    headers_sent = true;
    if (http10) keep_alive = false;  // the end of the body is the end of the connection
    send(head(status, ct, extra, -1), false);
  }
  void stream(std::string data) {
    if (!headers_sent || reply_ended || closing || data.empty()) return;
    if (http10) return send(std::move(data), false);
    char hex[24];
    std::snprintf(hex, sizeof hex, "%zx\r\n", data.size());
    send(hex + std::move(data) + "\r\n", false);
  }
  void end_stream() {
    if (!headers_sent || reply_ended || closing) return;
    send(http10 ? std::string() : std::string("0\r\n\r\n"), true);
  }

  std::shared_ptr<HttpExchange> make_exchange();
};

namespace {

// An exchange posts each call to the IO thread, where it applies only while its request
// is the session's current one.
class Exchange : public HttpExchange {
 public:
  Exchange(std::shared_ptr<Session> s, uint64_t seq) : s_(std::move(s)), seq_(seq) {}
  void respond(int status, std::string ct, std::string body, HttpHeaders extra) override {
    run([=, ct = std::move(ct), body = std::move(body), extra = std::move(extra)](Session& s) mutable {
      s.respond(status, std::move(ct), std::move(body), extra);
    });
  }
  void start_stream(int status, std::string ct, HttpHeaders extra) override {
    run([=, ct = std::move(ct), extra = std::move(extra)](Session& s) mutable { s.start_stream(status, ct, extra); });
  }
  void stream(std::string data) override {
    run([data = std::move(data)](Session& s) mutable { s.stream(std::move(data)); });
  }
  void end_stream() override {
    run([](Session& s) { s.end_stream(); });
  }
  void on_client_gone(std::function<void()> f) override {
    net::post(s_->srv.io, [s = s_, seq = seq_, f = std::move(f)]() mutable {
      if (s->seq != seq) return;
      if (s->gone) return f();
      if (!s->reply_ended) s->gone_cb = std::move(f);
    });
  }

 private:
  template <class F>
  void run(F&& f) {
    net::post(s_->srv.io, [s = s_, seq = seq_, f = std::forward<F>(f)]() mutable {
      if (s->seq == seq && s->busy) f(*s);
    });
  }
  std::shared_ptr<Session> s_;
  uint64_t seq_;
};

}  // namespace

std::shared_ptr<HttpExchange> Session::make_exchange() { return std::make_shared<Exchange>(shared_from_this(), seq); }

void HttpServer::Impl::accept() {
  acc.async_accept([this](beast::error_code ec, tcp::socket sock) {
    if (ec) {
      if (ec == net::error::operation_aborted || !acc.is_open()) return;
      // Out of file descriptors (EMFILE/ENFILE) and the like: the pending connection stays
      // in the backlog; retry in 50 ms instead of spinning, and say so once a minute.
      const double t = std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
      if (t - last_emfile_log > 60) {
        ATMOE_LOG("http")->warn("accept: {} ({} connections open); retrying", ec.message(), conns.load());
        last_emfile_log = t;
      }
      backoff.expires_after(std::chrono::milliseconds(50));
      backoff.async_wait([this](beast::error_code e) {
        if (!e && acc.is_open()) accept();
      });
      return;
    }
    sock.set_option(tcp::no_delay(true), ec);  // SSE chunks leave at once
    auto s = std::make_shared<Session>(*this, std::move(sock));
    sessions.erase(std::remove_if(sessions.begin(), sessions.end(), [](auto& w) { return w.expired(); }),
                   sessions.end());
    sessions.push_back(s);
    if (conns > o.max_connections)
      s->reject(503, "too many connections (the server's limit is " + std::to_string(o.max_connections) + ")");
    else
      s->do_read();
    accept();
  });
}

HttpServer::HttpServer(const HttpServerOptions& o, HttpHandler h) : impl_(std::make_unique<Impl>()) {
  impl_->o = o;
  impl_->handler = std::move(h);
  beast::error_code ec;
  tcp::resolver res(impl_->io);
  auto eps = res.resolve(o.host, std::to_string(o.port), tcp::resolver::passive | tcp::resolver::numeric_service, ec);
  ATMOE_CHECK_INPUT(!ec && !eps.empty(), "--host {}: cannot resolve: {}", o.host, ec.message());
  const tcp::endpoint ep = eps.begin()->endpoint();
  auto& acc = impl_->acc;
  acc.open(ep.protocol(), ec);
  if (!ec) acc.set_option(net::socket_base::reuse_address(true), ec);
  if (!ec) acc.bind(ep, ec);
  if (!ec) acc.listen(net::socket_base::max_listen_connections, ec);
  ATMOE_CHECK_INPUT(!ec, "--host {} --port {}: cannot listen: {}", o.host, o.port, ec.message());
  impl_->port = acc.local_endpoint().port();
  // Connections need file descriptors: raise the soft limit to the hard one, and keep
  // --max-connections below it (with room for the model files, logs and MPI).
  rlimit rl{};
  if (::getrlimit(RLIMIT_NOFILE, &rl) == 0) {
    if (rl.rlim_cur < rl.rlim_max) {
      rl.rlim_cur = rl.rlim_max;
      ::setrlimit(RLIMIT_NOFILE, &rl);
      ::getrlimit(RLIMIT_NOFILE, &rl);
    }
    const int64_t room = rl.rlim_cur == RLIM_INFINITY ? INT64_MAX : int64_t(rl.rlim_cur) - 64;
    if (int64_t(impl_->o.max_connections) > room) {
      impl_->o.max_connections = int(std::max<int64_t>(1, room));
      ATMOE_LOG("http")->warn("--max-connections lowered to {}: the file descriptor limit is {} (ulimit -n)",
                               impl_->o.max_connections, int64_t(rl.rlim_cur));
    }
  }
}

HttpServer::~HttpServer() {
  if (impl_->th.joinable()) stop();
}

int HttpServer::port() const { return impl_->port; }
int HttpServer::connections() const { return impl_->conns; }

void HttpServer::start() {
  impl_->accept();
  impl_->th = std::thread([this] { impl_->io.run(); });
}

void HttpServer::stop() {
  net::post(impl_->io, [this] {
    impl_->stopping = true;
    beast::error_code ec;
    impl_->acc.close(ec);
    for (auto& w : impl_->sessions)
      if (auto s = w.lock()) s->close();
  });
  impl_->work.reset();
  if (impl_->th.joinable()) impl_->th.join();
}

}  // namespace atmoe::app
