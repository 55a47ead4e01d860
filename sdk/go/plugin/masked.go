package plugin

import (
	neturl "net/url"
	"strings"
)

// urlMask stands for a credential in a URL a line shows.
const urlMask = "***"

// maskedURL is raw as a log line or an error may show it, as the dispatcher shows one
// (providers.model.masked_url): the password of its userinfo masked (a user without a
// password whole: a token may be the user), the value of every query parameter (a token
// in ?token=… or ?api_key=…) and an item without "=" whole (?TOKEN: it is a value
// itself); no fragment. A URL that does not parse is not shown at all: it may still hold
// what masking would have hidden.
func maskedURL(raw string) string {
	parsed, err := neturl.Parse(strings.TrimSpace(raw))
	if err != nil {
		return "(a URL that does not parse)"
	}
	if parsed.User != nil {
		if _, has := parsed.User.Password(); has {
			parsed.User = neturl.UserPassword(parsed.User.Username(), urlMask)
		} else {
			parsed.User = neturl.User(urlMask)
		}
	}
	if parsed.RawQuery != "" {
		var masked []string
		for _, item := range strings.Split(parsed.RawQuery, "&") {
			if name, _, found := strings.Cut(item, "="); found {
				masked = append(masked, name+"="+urlMask)
			} else {
				masked = append(masked, urlMask)
			}
		}
		parsed.RawQuery = strings.Join(masked, "&")
	}
	parsed.Fragment, parsed.RawFragment = "", ""
	// String escapes the mask's asterisks in the userinfo: unescaped, they read better.
	return strings.Replace(parsed.String(), "%2A%2A%2A", urlMask, 1)
}

// maskedText is text with raw, as written or as Go's errors quote it (its password
// redacted, its query and fragment kept: `Get "http://host/path?TOKEN#TOKEN"`), shown as
// maskedURL shows it. Should a credential of raw still show (quoted some other way), the
// text is not shown at all.
func maskedText(text, raw string) string {
	raw = strings.TrimSpace(raw)
	parsed, err := neturl.Parse(raw)
	if err != nil {
		return "(its text is not shown: it may quote the URL)"
	}
	text = strings.ReplaceAll(text, raw, maskedURL(raw))
	if parsed.RawQuery != "" {
		masked, _ := neturl.Parse(maskedURL(raw))
		text = strings.ReplaceAll(text, "?"+parsed.RawQuery, "?"+masked.RawQuery)
	}
	var secrets []string
	if parsed.Fragment != "" {
		for _, fragment := range []string{parsed.EscapedFragment(), parsed.Fragment} {
			text = strings.ReplaceAll(text, "#"+fragment, "")
			secrets = append(secrets, fragment)
		}
	}
	for _, item := range strings.Split(parsed.RawQuery, "&") {
		if !strings.Contains(item, "=") { // an item without "=" is a value itself
			unescaped, _ := neturl.QueryUnescape(item)
			secrets = append(secrets, item, unescaped)
		}
	}
	if parsed.User != nil {
		if password, has := parsed.User.Password(); has {
			text = strings.ReplaceAll(text, ":"+password+"@", ":"+urlMask+"@")
			secrets = append(secrets, password)
		} else {
			text = strings.ReplaceAll(text, "//"+parsed.User.Username()+"@", "//"+urlMask+"@")
			secrets = append(secrets, parsed.User.Username())
		}
	}
	for _, values := range parsed.Query() {
		secrets = append(secrets, values...)
	}
	for _, secret := range secrets {
		if len(secret) >= 4 && strings.Contains(text, secret) {
			return "(its text is not shown: it quotes the URL's credentials)"
		}
	}
	return text
}
